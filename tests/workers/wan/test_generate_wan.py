"""`longroll generate` with Wan presets: weights layouts give identical latents, the trace, the text
encoder path, batch- and resume-exactness, and bad input (one `error:` line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import UMT5EncoderModel

from orchestrator.cli import main
from tests.workers.wan.conftest import save_original_folder, training_checkpoint
from tests.workers.wan.models import random_transformer, tiny_cfg
from tests.workers.wan.text_fixtures import hf_to_wan_keys, make_tiny_text_parts
from workers.generator import Generator
from workers.models.source import ModelSource
from workers.models.wan.text import pad_prompt_embeds
from workers.state import StreamState
from workers.types import StreamSpec

SHAPE = ["--height", "64", "--width", "64", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """One random tiny Wan model as a diffusers folder, a pipeline folder with a real tiny umT5 encoder,
    a Self-Forcing .pt (original names) with a --base folder, and a prompt-embeddings file."""
    root = tmp_path_factory.mktemp("wan-parts")
    model = random_transformer(tiny_cfg(), seed=7)
    model.save_pretrained(root / "diffusers")
    pipe = root / "pipeline"
    model.save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
    }))  # fmt: skip
    enc, tok = make_tiny_text_parts(root / "text")
    shutil.copytree(enc, pipe / "text_encoder")
    shutil.copytree(tok, pipe / "tokenizer")
    other = random_transformer(tiny_cfg(), seed=8)  # the .pt's "generator": not what EMA inference loads
    torch.save(
        {"generator": training_checkpoint(other), "generator_ema": training_checkpoint(model),
         "critic": {"critic.w": torch.zeros(2)}},
        root / "self_forcing_dmd.pt",
    )  # fmt: skip
    # the original Wan2.1 folder: original transformer names, Wan's own umT5 .pth and google/umt5-xxl tokenizer
    original = save_original_folder(model, root / "Wan2.1-T2V-tiny")
    torch.save(hf_to_wan_keys(UMT5EncoderModel.from_pretrained(enc).state_dict()),
               original / "models_t5_umt5-xxl-enc-bf16.pth")  # fmt: skip
    shutil.rmtree(original / "google" / "umt5-xxl")
    shutil.copytree(tok, original / "google" / "umt5-xxl")
    base = root / "base"
    base.mkdir()
    shutil.copy(root / "diffusers" / "config.json", base / "config.json")
    save_file({"prompt_embeds": torch.randn(9, 16, generator=torch.Generator().manual_seed(1))}, str(root / "pe.st"))
    (root / "pe.st").rename(root / "pe.safetensors")
    return {"root": root, "diffusers": root / "diffusers", "pipeline": pipe, "pt": root / "self_forcing_dmd.pt",
            "base": base, "embeds": root / "pe.safetensors", "original": original}  # fmt: skip


def generate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", "--preset", "self-forcing-1.3b", *SHAPE, *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_diffusers_folder_and_self_forcing_pt_give_identical_latents(parts, capsys, tmp_path):
    common = ["--chunks", "3", "--prompt-embeds", str(parts["embeds"]), "--seed", "4"]
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert generate(capsys, "--weights", str(parts["diffusers"]), "--latents-out", str(a), *common)[0] == 0
    assert generate(capsys, "--weights", str(parts["pt"]), "--base", str(parts["base"]), "--latents-out", str(b),
                    *common)[0] == 0  # fmt: skip
    assert generate(capsys, "--weights", str(parts["pt"]), "--base", str(parts["base"]), "--no-ema",
                    "--latents-out", str(c), *common)[0] == 0  # fmt: skip
    la, lb, lc = (load_file(p)["latents"] for p in (a, b, c))
    assert la.shape == (9, 4, 8, 8) and la.dtype == torch.float32 and la.std() > 0.1
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)  # --no-ema loads the other generator


def test_trace_file_has_every_step_and_the_latents(parts, capsys, tmp_path):
    lat, trace = tmp_path / "l.safetensors", tmp_path / "t.safetensors"
    code, out, _ = generate(capsys, "--weights", str(parts["diffusers"]), "--prompt-embeds", str(parts["embeds"]),
                            "--chunks", "2", "--latents-out", str(lat), "--trace", str(trace))  # fmt: skip
    assert code == 0 and "latent frames" in out
    t = load_file(trace)
    assert set(t) == {f"{n}.{c}.{s}" for n in ("x_t", "sigma", "x0") for c in range(2) for s in range(4)} | {"latents"}
    assert t["x_t.1.0"].shape == (3, 4, 8, 8) and t["sigma.0.2"].shape == ()
    assert [round(float(t[f"sigma.0.{s}"]), 4) for s in range(4)] == [1.0, 0.9375, 0.8333, 0.625]
    assert torch.equal(t["latents"], load_file(lat)["latents"])
    assert torch.equal(t["latents"][3:], t["x0.1.3"])  # the last step's x0 is the chunk


def test_pipeline_folder_encodes_the_prompt_with_its_umt5(parts, capsys, tmp_path):
    out = tmp_path / "l.safetensors"
    code, _, err = generate(capsys, "--weights", str(parts["pipeline"]), "--prompt", "a red fox", "--chunks", "1",
                            "--latents-out", str(out))  # fmt: skip
    assert code == 0, err
    gen = Generator(tiny_cfg(), source=ModelSource(weights=str(parts["pipeline"])))
    state = gen.new_stream(StreamSpec("x", prompt="a red fox"))
    other = gen.new_stream(StreamSpec("y", prompt="a blue whale"))
    assert state.cond.shape[1] == 16 and not torch.equal(pad_prompt_embeds(state.cond), pad_prompt_embeds(other.cond))
    assert torch.equal(gen.step([state])[0].latents, load_file(out)["latents"])
    # the README's Self-Forcing line: a .pt on the pipeline folder's config, encoder and tokenizer
    again = tmp_path / "pt.safetensors"
    code, _, err = generate(capsys, "--weights", str(parts["pt"]), "--base", str(parts["pipeline"]), "--prompt",
                            "a red fox", "--chunks", "1", "--latents-out", str(again))  # fmt: skip
    assert code == 0, err
    assert torch.equal(load_file(again)["latents"], load_file(out)["latents"])
    # the original Wan2.1 folder: original names, and its own umT5 .pth mapped into UMT5EncoderModel
    orig = tmp_path / "orig.safetensors"
    code, _, err = generate(capsys, "--weights", str(parts["original"]), "--prompt", "a red fox", "--chunks", "1",
                            "--latents-out", str(orig), "--dtype", "fp32")  # fmt: skip
    assert code == 0, err
    assert torch.equal(load_file(orig)["latents"], load_file(out)["latents"])


def test_batched_streams_and_resume_are_bit_exact(parts, tmp_path):
    torch.set_num_threads(1)
    src = ModelSource(weights=str(parts["diffusers"]), prompt_embeds=str(parts["embeds"]))
    gen = Generator(tiny_cfg(), source=src)
    specs = [StreamSpec(f"s{i}", seed=i) for i in range(2)]
    alone = [[gen.step([st])[0].latents for _ in range(4)] for st in (gen.new_stream(s) for s in specs)]
    states = [gen.new_stream(s) for s in specs]
    batched = [[], []]
    for c in range(4):
        for i, ch in enumerate(gen.step(states)):
            batched[i].append(ch.latents)
        if c == 1:
            states[0].save(tmp_path / "ckpt")
    assert all(torch.equal(x, y) for a, b in zip(alone, batched) for x, y in zip(a, b))
    fresh = Generator(tiny_cfg(), source=src)  # another generator: text K/V rebuilt from the checkpointed embeddings
    resumed = StreamState.load(tmp_path / "ckpt")
    assert resumed.next_chunk == 2 and torch.equal(resumed.cond, states[0].cond)
    assert all(torch.equal(fresh.step([resumed])[0].latents, alone[0][c]) for c in (2, 3))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "{root}"], "not a diffusers transformer or pipeline folder"),
        (["--weights", "{root}/foreign.pt", "--prompt-embeds", "{embeds}"], "missing"),
        (["--weights", "{pt}", "--base", "{root}/wide", "--prompt-embeds", "{embeds}"], "shape"),
        (["--weights", "{diffusers}"], "--prompt-embeds"),
        (["--weights", "{diffusers}", "--prompt-embeds", "{root}/narrow.safetensors"], "text_dim"),
        (["--weights", "{diffusers}", "--prompt-embeds", "{embeds}", "--out", "{tmp}/v.mp4"], "--latents-out"),
        (["--weights", "{diffusers}", "--prompt-embeds", "{embeds}", "--trajectory", "revisit"], "world model"),
    ],
)
def test_bad_input_one_error_line_exit_2_nothing_written(parts, capsys, tmp_path, args, message):
    root = parts["root"]
    if not (root / "foreign.pt").exists():
        torch.save({"generator": {"model.foo.weight": torch.zeros(3)}}, root / "foreign.pt")
        (root / "wide").mkdir()
        cfg = (parts["diffusers"] / "config.json").read_text().replace('"ffn_dim": 32', '"ffn_dim": 40')
        (root / "wide" / "config.json").write_text(cfg)
        save_file({"prompt_embeds": torch.randn(4, 12)}, str(root / "narrow.safetensors"))
    fmt = {k: str(v) for k, v in parts.items()} | {"tmp": str(tmp_path)}
    out = tmp_path / "out.safetensors"
    code, stdout, err = generate(capsys, "--chunks", "1", "--latents-out", str(out), *(a.format(**fmt) for a in args))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"
