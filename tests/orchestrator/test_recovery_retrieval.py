"""A SIGKILLed worker in memory="retrieval" mode: the resumed streams warm their hot tier from the
LanceDB table version their checkpoint recorded, and every frame equals an uninterrupted run.

Run twice: random weights with content-keyed retrieval, and the shipped world model with a moving
camera, a world prompt and pose-keyed retrieval."""

import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from orchestrator.actor import start_orchestrator
from orchestrator.registry import RunSpec, StreamEntry
from tests.orchestrator.test_recovery import UPSCALE, wait_for
from workers.config import ModelConfig
from workers.generator import Generator
from workers.memory import MemoryLink, default_embedder
from workers.types import StreamSpec
from workers.video import Mp4Writer, read_mp4
from workers.weights import resolve

pytestmark = pytest.mark.slow
CFG = replace(ModelConfig.from_name("tiny"), memory="retrieval")
CHUNKS = 12


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def reference(spec: StreamSpec, tmp: Path, weights: str | None) -> tuple[np.ndarray, list]:
    torch.set_num_threads(1)
    with MemoryLink(str(tmp / f"ref-{spec.stream_id}"), CFG) as link:
        gen = Generator(CFG, weights=resolve(weights, CFG), memory=link.retriever, embedder=default_embedder(CFG))
        state, mems = gen.new_stream(spec), []
        with Mp4Writer(tmp / f"ref-{spec.stream_id}.mp4", CFG.fps, upscale=UPSCALE, crf=0) as w:
            for _ in range(CHUNKS):
                (ch,) = gen.step([state])
                link.publish(ch)
                mems.append(ch.memory_chunks)
                w.write(ch.frames)
    return read_mp4(tmp / f"ref-{spec.stream_id}.mp4"), mems


@pytest.mark.parametrize("world", [False, True], ids=["random-weights", "world-model"])
def test_sigkill_in_retrieval_mode_resumes_identically(ray_session, tmp_path, world):
    out = tmp_path / "run"
    camera = dict(trajectory="revisit") if world else {}
    streams = [StreamEntry(StreamSpec(f"r{i}", seed=30 + i, world=40 + i if world else None, **camera), CHUNKS)
               for i in range(2)]  # fmt: skip
    weights = "shipped" if world else None
    spec = RunSpec(out_dir=str(out.resolve()), model=CFG.to_dict(), streams=streams, workers=2,
                   checkpoint_every=4, segment_chunks=2, upscale=UPSCALE, weights=weights)  # fmt: skip
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 2 and min(s.next_chunk for s in p.streams) >= 6,
                     what="every stream past chunk 6")  # fmt: skip
        victim = max(p.workers, key=lambda w: len(w.stream_ids))
        os.kill(victim.pid, signal.SIGKILL)
        p = wait_for(orch, lambda p: p.state == "done", what="run done")
    finally:
        ray.kill(orch, no_restart=True)
    assert [r.worker_id for r in p.recoveries] == [victim.worker_id]
    import json

    for e in streams:
        sid = e.spec.stream_id
        m = json.loads((spec.stream_dir(sid) / "manifest.json").read_text())
        assert m["state"] == "done"
        got = np.concatenate([read_mp4(spec.stream_dir(sid) / s["file"]) for s in m["segments"]])
        want, mems = reference(e.spec, tmp_path, weights)
        assert any(mems), "the reference never retrieved anything: the test would not exercise memory"
        assert got.shape == want.shape and np.array_equal(got, want), f"{sid}: frames differ"
