"""A Wan-family `run` on a real Ray: 2 streams of a tiny random Wan model (a diffusers folder), one
worker SIGKILLed mid-run; the latent segments must equal the same streams generated uninterrupted."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from orchestrator.actor import start_orchestrator
from orchestrator.cli import build_parser
from orchestrator.run_options import build_run_spec
from tests.orchestrator.test_recovery import wait_for
from tests.workers.wan.models import random_transformer, tiny_cfg
from workers.config import ModelConfig
from workers.generator import Generator
from workers.models.source import ModelSource

pytestmark = pytest.mark.slow
CHUNKS = 8


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def wan_parts(tmp: Path) -> tuple[str, str]:
    """A tiny random Wan transformer as a diffusers folder, and a prompt-embeddings file."""
    folder = tmp / "tiny-wan"
    random_transformer(tiny_cfg(), seed=3).save_pretrained(folder)
    embeds = tmp / "prompt.safetensors"
    save_file({"prompt_embeds": torch.randn(7, 16, generator=torch.Generator().manual_seed(5))}, str(embeds))
    return str(folder), str(embeds)


def test_wan_run_survives_sigkilled_worker_with_identical_latents(ray_session, tmp_path):
    weights, embeds = wan_parts(tmp_path)
    out = tmp_path / "run"
    args = build_parser().parse_args([
        "run", "--preset", "self-forcing-1.3b", "--weights", weights, "--prompt-embeds", embeds, "--dtype", "fp32",
        "--streams", "2", "--chunks", str(CHUNKS), "--workers", "2", "--checkpoint-every", "2", "--out", str(out),
        "--no-dashboard", "--height", "64", "--width", "64",
    ])  # fmt: skip
    spec = build_run_spec(args)
    cfg = ModelConfig.from_dict(spec.model)
    assert cfg.family == "wan" and cfg.dim == 24 and cfg.latent_channels == 4  # shapes from the folder's config
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 2 and min(s.next_chunk for s in p.streams) >= 3,
                     what="every stream past chunk 3")  # fmt: skip
        victim = next(w for w in p.workers if w.stream_ids)
        os.kill(victim.pid, signal.SIGKILL)
        p = wait_for(orch, lambda p: p.state == "done", what="run done")
    finally:
        ray.kill(orch, no_restart=True)
    assert [r.worker_id for r in p.recoveries] == [victim.worker_id]

    torch.set_num_threads(1)
    gen = Generator(cfg, source=ModelSource.from_dict(spec.model_source))
    for entry in spec.streams:
        state = gen.new_stream(entry.spec)
        want = torch.cat([gen.step([state])[0].latents for _ in range(CHUNKS)])
        m = spec.manifest(entry.spec.stream_id)
        assert m["state"] == "done" and m["chunks_done"] == CHUNKS
        sdir = spec.stream_dir(entry.spec.stream_id)
        got = torch.cat([load_file(sdir / s["file"])["latents"] for s in m["segments"]])
        assert got.shape == (CHUNKS * 3, 4, 8, 8)
        assert torch.equal(got, want), f"{entry.spec.stream_id}: latents differ from the uninterrupted rollout"


@pytest.mark.parametrize("decode_actors", [0, 1], ids=["decode-in-worker", "decode-pool"])
def test_wan_video_run_survives_sigkilled_worker_with_identical_frames(ray_session, tmp_path, capsys, decode_actors):
    """With --vae: mp4 segments (lossless RGB) + latent sidecars, decoded in the worker or in a decode pool.
    The worker is killed after a checkpoint past the decoder's replay length, so its streams rebuild the
    VAE cache from their latent history (in the pool: the actor of the new worker)."""
    from orchestrator.cli import main
    from workers.models.wan.vae import RESUME_LATENT_FRAMES, TINY_VAE_CONFIG, random_vae
    from workers.video import read_mp4

    weights, embeds = wan_parts(tmp_path)
    vae = tmp_path / "vae"
    random_vae(TINY_VAE_CONFIG, seed=4).save_pretrained(vae)
    chunks, past = 20, RESUME_LATENT_FRAMES // 3 + 2  # checkpoint chunk whose history is a full replay
    out = tmp_path / "run"
    args = build_parser().parse_args([
        "run", "--preset", "self-forcing-1.3b", "--weights", weights, "--prompt-embeds", embeds, "--dtype", "fp32",
        "--vae", str(vae), "--lossless", "--streams", "2", "--chunks", str(chunks), "--workers", "2",
        "--checkpoint-every", "2", "--out", str(out), "--no-dashboard", "--height", "32", "--width", "32",
        "--decode-actors", str(decode_actors),
    ])  # fmt: skip
    spec = build_run_spec(args)
    assert spec.decode_actors == decode_actors
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 2 and min(s.last_checkpoint or 0 for s in p.streams) >= past,
                     what=f"every stream checkpointed past chunk {past}")  # fmt: skip
        victim = next(w for w in p.workers if w.stream_ids)
        os.kill(victim.pid, signal.SIGKILL)
        p = wait_for(orch, lambda p: p.state == "done", what="run done")
    finally:
        ray.kill(orch, no_restart=True)
    assert [r.worker_id for r in p.recoveries] == [victim.worker_id]

    torch.set_num_threads(1)
    gen = Generator(ModelConfig.from_dict(spec.model), source=ModelSource.from_dict(spec.model_source))
    for entry in spec.streams:
        sid = entry.spec.stream_id
        state = gen.new_stream(entry.spec)
        steps = [gen.step([state])[0] for _ in range(chunks)]
        want = torch.cat([c.frames for c in steps]).numpy()
        m, sdir = spec.manifest(sid), spec.stream_dir(sid)
        assert m["state"] == "done" and m["output"] == "mp4" and len(want) == 1 + 4 * (3 * chunks - 1)
        got = np.concatenate([read_mp4(sdir / s["file"]) for s in m["segments"]])
        assert got.shape == want.shape and np.array_equal(got, want), f"{sid}: frames differ from an uninterrupted run"
        sidecars = torch.cat([load_file(sdir / s["latents"])["latents"] for s in m["segments"]])
        assert torch.equal(sidecars, torch.cat([c.latents for c in steps]))
        video, lat = tmp_path / f"{sid}.mp4", tmp_path / f"{sid}.safetensors"
        assert main(["export", sid, str(video), "--out", str(out)]) == 0, capsys.readouterr().err
        assert np.array_equal(read_mp4(video), got), f"{sid}: export differs from its segments"
        assert main(["export", sid, str(lat), "--latents", "--out", str(out)]) == 0, capsys.readouterr().err
        assert torch.equal(load_file(lat)["latents"], sidecars)
