"""The world model: training forward vs inference, world prompts, pose-keyed retrieval, train-world,
and the shipped weights."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ops.rope import Rope3D
from workers.config import ModelConfig
from workers.generator import Generator
from workers.models.tiny.model import CausalVideoDiT
from workers.types import StreamSpec
from workers.weights import WORLD_TINY, default_weights, resolve, shipped_fits
from workers.world.forward import train_forward

CLI = [sys.executable, "-m", "orchestrator.cli"]


def test_training_forward_equals_the_generator_forward():
    """[chunk 0 clean | chunk 1 noisy] in one masked pass = the generator's cached two-step path."""
    cfg = ModelConfig.from_name("tiny")
    gen = Generator(cfg)
    spec = StreamSpec("s", seed=3, trajectory="revisit", world=5)
    state = gen.new_stream(spec)
    (c0,) = gen.step([state])
    frames = torch.arange(3, 6)
    x = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        v_inf = gen.model(
            x,
            torch.tensor([0.75]),
            state.cond[None],
            gen.camera.actions(spec, frames)[None],
            [gen._context(state, frames)],
        )
    pol = cfg.position_policy()
    tids = torch.cat([pol.temporal_ids(torch.tensor([0]), "sink", 5), pol.temporal_ids(torch.arange(1, 6), "local", 5)])
    vis = torch.ones(6, 6, dtype=torch.bool)
    vis[:3, 3:] = False  # chunk 0 never sees chunk 1
    out = torch.tensor([False] * 3 + [True] * 3)
    with torch.no_grad():
        v_tr = train_forward(
            gen.model, Rope3D(cfg.rope_width, cfg.rope_theta), torch.cat([c0.latents[None], x], 1),
            torch.tensor([[0, 0, 0, 0.75, 0.75, 0.75]]), state.cond[None],
            gen.camera.actions(spec, torch.arange(6))[None],
            tids[None], gen.camera.poses(spec, torch.arange(6))[None], vis[None], out,
        )  # fmt: skip
    err = (v_tr - v_inf).pow(2).mean().sqrt() / v_inf.pow(2).mean().sqrt()
    assert err < 1e-5, f"RMS-relative difference {err:.2e}"


def test_world_prompt_is_the_true_view_and_the_camera_moves():
    cfg = ModelConfig.from_name("tiny")
    gen = Generator(cfg)
    spec = StreamSpec("s", seed=1, trajectory="revisit", world=77)
    state = gen.new_stream(spec)
    c0, c1 = gen.step([state])[0], gen.step([state])[0]
    truth = gen.camera.true_views(77, gen.camera.poses(spec, torch.arange(6)))
    assert torch.equal(c0.latents, truth[:3])  # the prompt chunk is the world itself
    assert not torch.allclose(c1.latents, truth[3:], atol=0.05)  # later chunks are generated
    assert gen.camera.actions(spec, torch.arange(6)).abs().sum() > 0


def test_pose_keyed_retrieval_brings_back_the_first_visit(tmp_path):
    from workers.memory import MemoryLink, default_embedder

    cfg = ModelConfig.from_name("tiny", memory="retrieval")
    spec = StreamSpec("s", seed=2, trajectory="revisit", world=3)
    with MemoryLink(str(tmp_path / "memory"), cfg) as link:
        gen = Generator(cfg, memory=link.retriever, embedder=default_embedder(cfg))
        state = gen.new_stream(spec)
        chunks = []
        for _ in range(90):
            (c,) = gen.step([state])
            link.publish(c)
            chunks.append(c)
    poses = gen.camera.poses(spec, torch.arange(270))
    checked = 0
    for c in chunks[10:]:
        here = {tuple(p) for p in poses[c.first_frame : c.first_frame + 3].tolist()}
        candidates = [
            k for k in range(c.chunk_index - 3) if here & {tuple(p) for p in poses[3 * k : 3 * k + 3].tolist()}
        ]
        if candidates and c.chunk_index - candidates[0] > 8:
            assert set(c.memory_chunks) & set(candidates), (c.chunk_index, c.memory_chunks, candidates)
            checked += 1
    assert checked >= 5


def test_train_world_resumes_exactly(tmp_path):
    """2 steps, then 2 more in a new process = 4 steps at once (same weights, same losses)."""
    run = lambda d, steps: subprocess.run(  # noqa: E731
        [*CLI, "train-world", "--out", str(d), "--recipe", "smoke", "--steps", str(steps), "--quiet", "--json",
         "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    for proc in (run(a, 2), run(a, 4), run(b, 4)):
        assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 4 and Path(summary["loss_plot"]).read_bytes()[:4] == b"\x89PNG"
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    la = json.loads((a / "train_state.json").read_text())["losses"]
    lb = json.loads((b / "train_state.json").read_text())["losses"]
    assert la == lb and len(la) == 4
    again = run(a, 3)  # fewer steps than already done: refused, nothing written
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already past step" in again.stderr


@pytest.mark.parametrize(
    "args, match",
    [(["--recipe", "huge"], "unknown training preset"), (["--steps", "0"], "steps"), (["--device", "tpu"], "device")],
)
def test_train_world_bad_input(tmp_path, args, match):
    proc = subprocess.run(
        [*CLI, "train-world", "--out", str(tmp_path / "r"), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and match in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r" / "train_state.json").exists()


def test_shipped_weights_fit_the_tiny_latent_model():
    assert WORLD_TINY.is_file() and WORLD_TINY.stat().st_size <= 20 * 2**20
    cfg = ModelConfig.from_name("tiny")
    assert shipped_fits(cfg) and default_weights(cfg) == "shipped"
    model = CausalVideoDiT(cfg)
    model.load_state_dict(load_file(str(WORLD_TINY)), strict=True)
    mha = ModelConfig.from_name("tiny", attention="mha")
    assert default_weights(mha) == "random" and resolve("random", mha) is None
    with pytest.raises(ValueError, match="do not fit"):
        resolve("shipped", mha)
    card = WORLD_TINY.with_name("MODEL_CARD.md").read_text()
    for word in ("steps", "wall", "hardware", "train-world", "loss"):
        assert word in card.lower()
    assert WORLD_TINY.with_name("world-tiny-loss.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_uses_the_world_model_by_default(tmp_path):
    out = tmp_path / "v.mp4"
    proc = subprocess.run(
        [*CLI, "generate", "--frames", "9", "--out", str(out), "--json", "--quiet", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["weights"] == "shipped" and s["trajectory"] == "revisit" and s["world"] == 0 and out.stat().st_size > 0


@pytest.mark.parametrize(
    "args, match",
    [
        (["--trajectory", "circle"], "unknown trajectory"),
        (["--trajectory", "none", "--world", "3"], "needs a camera"),
        (["--weights", "shipped", "--attention", "mha"], "do not fit"),
        (["--weights", "missing.safetensors"], "not found"),
    ],
)
def test_generate_world_options_bad_input(tmp_path, args, match):
    out = tmp_path / "v.mp4"
    proc = subprocess.run(
        [*CLI, "generate", "--frames", "3", "--out", str(out), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and match in proc.stderr and proc.stderr.count("\n") == 1
    assert not out.exists()


def _revisit_psnr(cfg: ModelConfig, world: int, frames: int, tmp_path) -> float:
    """Mean PSNR (dB) between the views at returns beyond the window and at the first visits."""
    from workers.memory import MemoryLink, default_embedder
    from workers.world.trajectory import returns

    spec = StreamSpec("q", seed=world % 1000, trajectory="revisit", world=world)
    link = MemoryLink(str(tmp_path / f"m-{cfg.memory}"), cfg) if cfg.memory == "retrieval" else None
    kwargs = dict(memory=link.retriever, embedder=default_embedder(cfg)) if link is not None else {}
    gen = Generator(cfg, weights=resolve("shipped", cfg), **kwargs)
    state, out = gen.new_stream(spec), []
    try:
        while len(out) * 3 < frames:
            (c,) = gen.step([state])
            if link is not None:
                link.publish(c)
            out.append(c.latents)
    finally:
        if link is not None:
            link.close()
    lat = torch.cat(out)
    pairs = returns(gen.camera.poses(spec, torch.arange(len(lat))))
    assert len(pairs) >= 20, "the trajectory must come back to places in this many frames"
    mse = torch.stack([((lat[t] - lat[t0]) / 2).pow(2).mean() for t0, t in pairs])
    return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())


@pytest.mark.slow
def test_the_shipped_model_remembers_with_retrieval_and_forgets_without(tmp_path):
    """On a held-out world, returns beyond the window look like the first visit with retrieval, not without."""
    from workers.world.data import HELD_OUT_WORLDS

    torch.set_num_threads(1)
    base = ModelConfig.from_name("tiny")
    window = _revisit_psnr(replace(base, memory="window", window_frames=12), HELD_OUT_WORLDS + 7, 300, tmp_path)
    retrieval = _revisit_psnr(replace(base, memory="retrieval"), HELD_OUT_WORLDS + 7, 300, tmp_path)
    assert retrieval - window >= 6.0, f"revisit PSNR: retrieval {retrieval:.2f} dB, window {window:.2f} dB"
