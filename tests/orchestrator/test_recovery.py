"""Runs on a real Ray: a SIGKILLed worker, a killed Orchestrator, a corrupted newest checkpoint.

Each run's decoded mp4 segments are compared with the same streams generated uninterrupted in this
process (lossless x264, so equal frames decode equal), and every manifest must list each chunk once.
"""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from orchestrator.actor import start_orchestrator
from orchestrator.registry import RunSpec, StreamEntry, request_stop
from orchestrator.resume import prepare_resume
from workers.config import ModelConfig
from workers.generator import Generator
from workers.types import StreamSpec
from workers.video import Mp4Writer, read_mp4
from workers.weights import resolve

pytestmark = pytest.mark.slow
TINY = ModelConfig.from_name("tiny")
UPSCALE = 2


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


_REFERENCE: dict[tuple, np.ndarray] = {}


def reference_frames(spec: StreamSpec, chunks: int, tmp: Path, weights: str | None = None) -> np.ndarray:
    """The stream generated uninterrupted in this process, through the same lossless mp4 path."""
    key = (spec, chunks, weights)
    if key not in _REFERENCE:
        torch.set_num_threads(1)
        gen = Generator(TINY, weights=resolve(weights, TINY))
        state = gen.new_stream(spec)
        path = tmp / f"ref-{spec.stream_id}-{spec.seed}.mp4"
        with Mp4Writer(path, TINY.fps, upscale=UPSCALE, crf=0) as w:
            for _ in range(chunks):
                w.write(gen.step([state])[0].frames)
        _REFERENCE[key] = read_mp4(path)
    return _REFERENCE[key]


def make_run(out: Path, n_streams=3, chunks=12, workers=2, checkpoint_every=4, segment_chunks=2, seed=0) -> RunSpec:
    streams = [StreamEntry(StreamSpec(f"s{i}", seed=seed + i), chunks) for i in range(n_streams)]
    spec = RunSpec(out_dir=str(out.resolve()), model=TINY.to_dict(), streams=streams, workers=workers,
                   checkpoint_every=checkpoint_every, segment_chunks=segment_chunks, upscale=UPSCALE)
    spec.save()
    return spec


def wait_for(orch, pred, timeout=240, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            p = ray.get(orch.progress.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)  # restarting
            continue
        if pred(p):
            return p
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def check_outputs(spec: RunSpec, tmp: Path) -> None:
    """Every stream done; manifests list each chunk exactly once; decoded frames equal the reference."""
    for e in spec.streams:
        sid = e.spec.stream_id
        m = json.loads((spec.stream_dir(sid) / "manifest.json").read_text())
        assert m["state"] == "done" and m["chunks_done"] == e.target_chunks, m
        covered = [c for s in m["segments"] for c in range(s["first"], s["last"] + 1)]
        assert covered == list(range(e.target_chunks)), f"{sid}: chunks missing or duplicated: {covered}"
        on_disk = sorted(p.name for p in (spec.stream_dir(sid) / "segments").iterdir())
        assert on_disk == [Path(s["file"]).name for s in m["segments"]], "stray or missing segment files"
        got = np.concatenate([read_mp4(spec.stream_dir(sid) / s["file"]) for s in m["segments"]])
        want = reference_frames(e.spec, e.target_chunks, tmp, spec.weights)
        assert got.shape == want.shape and np.array_equal(got, want), f"{sid}: frames differ from uninterrupted run"


def test_sigkill_one_worker_every_stream_finishes_identical(ray_session, tmp_path):
    spec = make_run(tmp_path / "run")
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 2 and min(s.next_chunk for s in p.streams) >= 5,
                     what="every stream past chunk 5")
        victim = max(p.workers, key=lambda w: len(w.stream_ids))
        os.kill(victim.pid, signal.SIGKILL)
        p = wait_for(orch, lambda p: p.state == "done", what="run done")
    finally:
        ray.kill(orch, no_restart=True)
    assert [r.worker_id for r in p.recoveries] == [victim.worker_id]
    assert set(p.recoveries[0].streams) == set(victim.stream_ids) and p.recoveries[0].resumed_at is not None
    check_outputs(spec, tmp_path)


def test_orchestrator_killed_and_restarted_run_continues(ray_session, tmp_path):
    spec = make_run(tmp_path / "run", n_streams=2, seed=10)
    orch = start_orchestrator(spec.out_dir)
    try:
        first = ray.get(orch.ping.remote())
        wait_for(orch, lambda p: min(s.next_chunk for s in p.streams) >= 5, what="chunk 5")
        ray.kill(orch, no_restart=False)  # Ray restarts it: the constructor rebuilds the run from DIR
        wait_for(orch, lambda p: p.state == "done", what="run done after restart")
        assert ray.get(orch.ping.remote()) != first
    finally:
        ray.kill(orch, no_restart=True)
    assert sum(e["event"] == "orchestrator.start" for e in events(tmp_path / "run")) == 2
    check_outputs(spec, tmp_path)


def test_corrupt_newest_checkpoint_falls_back_to_previous(ray_session, tmp_path):
    out = tmp_path / "run"
    spec = make_run(out, n_streams=2, chunks=12, checkpoint_every=2, segment_chunks=2, seed=20)
    orch = start_orchestrator(spec.out_dir)
    try:
        wait_for(orch, lambda p: min(s.next_chunk for s in p.streams) >= 5, what="chunk 5")
        request_stop(spec.out_dir, None)  # every stream checkpoints where it is and stops
        wait_for(orch, lambda p: p.state == "stopped", what="stopped")
    finally:
        ray.kill(orch, no_restart=True)
    ckpts = sorted((out / "streams" / "s0" / "checkpoints").iterdir())
    assert len(ckpts) >= 2
    newest, previous = ckpts[-1], ckpts[-2]
    blob = bytearray((newest / "state.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (newest / "state.safetensors").write_bytes(bytes(blob))

    spec = RunSpec.load(out)
    assert prepare_resume(spec, []) == ["s0", "s1"]
    orch = start_orchestrator(spec.out_dir)
    try:
        wait_for(orch, lambda p: p.state == "done", what="resumed run done")
    finally:
        ray.kill(orch, no_restart=True)
    fallbacks = [e for e in events(out) if e["event"] == "checkpoint.fallback"]
    assert [(e["stream_id"], e["chunk_index"]) for e in fallbacks] == [("s0", int(previous.name))]
    assert "sha256" in fallbacks[0]["skipped"][0]
    check_outputs(spec, tmp_path)
