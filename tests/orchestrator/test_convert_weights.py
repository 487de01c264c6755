"""`longroll convert-weights`: one loadable diffusers-named file, or exit 2 with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from orchestrator.cli import main
from tests.workers.wan.conftest import (
    random_wan,
    tiny_wan_config,
    training_checkpoint,
    wan_files,  # noqa: F401 - the session fixture, shared with the weights tests
)
from workers.models.wan.weights import load_state_dict, resolve_source


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_self_forcing_pt_with_base_converts_to_a_loadable_file(wan_files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sf.safetensors"
    code, stdout, err = cli(capsys, "convert-weights", wan_files.self_forcing, out, "--base", wan_files.original)
    assert code == 0, err
    assert "69 tensors" in stdout and "original Wan, converted" in stdout and str(out) in stdout
    sd = load_file(str(out))
    assert sd.keys() == wan_files.sd.keys() and all(torch.equal(sd[k], v) for k, v in wan_files.sd.items())
    with safe_open(str(out), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    model = WanTransformer3DModel(**config)  # the stored config builds the model the tensors fit
    model.load_state_dict(sd, strict=True)
    src = resolve_source(str(out))  # and the file alone is valid --weights, config included
    assert src.config == config and src.config["attention_head_dim"] == 12
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_no_ema_and_lora(wan_files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "gen.safetensors"
    code, _, err = cli(capsys, "convert-weights", wan_files.self_forcing, out, "--no-ema")
    assert code == 0, err
    sd = load_file(str(out))
    assert all(torch.equal(sd[k], v) for k, v in wan_files.self_forcing_generator_sd.items())
    base = random_wan(7)
    torch.save({"generator": training_checkpoint(base, fsdp=True)}, tmp_path / "longlive_base.pt")
    a, b = torch.randn(4, 24), torch.randn(24, 4)
    lora = {"base_model.model.blocks.1.cross_attn.k.lora_A.weight": a,
            "base_model.model.blocks.1.cross_attn.k.lora_B.weight": b}  # fmt: skip
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    out2 = tmp_path / "longlive.safetensors"
    code, stdout, err = cli(
        capsys, "convert-weights", tmp_path / "longlive_base.pt", out2, "--base", wan_files.diffusers,
        "--lora", tmp_path / "lora.pt",
    )  # fmt: skip
    assert code == 0, err
    assert "LoRA" in stdout
    merged, ref = load_file(str(out2)), base.state_dict()
    k = "blocks.1.attn2.to_k.weight"
    torch.testing.assert_close(merged[k], ref[k] + b @ a)
    assert all(torch.equal(merged[n], ref[n]) for n in ref if n != k)


def test_without_config_stores_none_but_checks_shapes(wan_files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "flat.safetensors"
    code, stdout, err = cli(capsys, "convert-weights", wan_files.flat_pt, out)
    assert code == 0, err
    assert "config: none" in stdout
    with safe_open(str(out), framework="pt") as f:
        assert "config" not in (f.metadata() or {})
    assert resolve_source(str(out)).config is None
    assert load_state_dict(resolve_source(str(out), base=str(wan_files.diffusers))).keys() == wan_files.sd.keys()


def foreign_pt(tmp_path):
    foreign = torch.nn.Linear(3, 5).state_dict()
    torch.save({"generator": {f"model.{k}": v for k, v in foreign.items()}}, tmp_path / "in" / "foreign.pt")
    return tmp_path / "in" / "foreign.pt"


@pytest.mark.parametrize(
    "case, message",
    [
        ("foreign_with_base", "69 missing and 2 unexpected tensors"),
        ("foreign_without_base", "not Wan transformer weights"),
        ("missing_src", "does not exist"),
        ("bad_suffix", "output file must end in .safetensors"),
        ("shape_mismatch", "shapes other than the config's"),
        ("lora_targets_absent", "LoRA targets 1 of its 1 modules that the weights lack"),
        ("empty_folder", "not a diffusers transformer or pipeline folder"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(wan_files, tmp_path, capsys, case, message):  # noqa: F811
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "w.safetensors"
    args = {
        "foreign_with_base": [foreign_pt(tmp_path), out, "--base", wan_files.diffusers],
        "foreign_without_base": [foreign_pt(tmp_path), out],
        "missing_src": [tmp_path / "in" / "nope.pt", out],
        "bad_suffix": [wan_files.causvid, tmp_path / "out" / "w.pt"],
        "shape_mismatch": [wan_files.causvid, out, "--base", tmp_path / "in"],
        "lora_targets_absent": [wan_files.causvid, out, "--lora", tmp_path / "in" / "lora.pt"],
        "empty_folder": [tmp_path / "in", out],
    }[case]
    if case == "shape_mismatch":
        (tmp_path / "in" / "config.json").write_text(json.dumps(tiny_wan_config(ffn_dim=48)))
    if case == "lora_targets_absent":
        torch.save({"blocks.9.self_attn.q.lora_A.weight": torch.ones(1, 24),
                    "blocks.9.self_attn.q.lora_B.weight": torch.ones(24, 1)}, tmp_path / "in" / "lora.pt")  # fmt: skip
    code, stdout, err = cli(capsys, "convert-weights", *args)
    assert code == 2
    assert message in one_error_line(err)
    assert list((tmp_path / "out").iterdir()) == []  # nothing written, no temp file either


def test_output_cannot_overwrite_its_input(wan_files, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "w.safetensors"
    src.write_bytes(wan_files.flat_safetensors.read_bytes())
    code, _, err = cli(capsys, "convert-weights", src, src)
    assert code == 2 and "is one of the inputs" in one_error_line(err)
    assert src.read_bytes() == wan_files.flat_safetensors.read_bytes()
