"""Generator groups (2 ranks, gloo on CPU) and direct stream migration, on a real Ray.

Outputs are compared with the same streams generated uninterrupted by the single-process Generator:
the group computes every reduction in the single-process order, so states and frames are bit-identical.
"""

import json
import os
import signal
import time
from dataclasses import replace

import pytest
import ray

from orchestrator.actor import start_orchestrator
from orchestrator.groups import remove_worker, spawn_worker
from orchestrator.registry import NAMESPACE, RunSpec, StreamEntry
from tests.orchestrator.test_recovery import TINY, UPSCALE, check_outputs, events, make_run, wait_for
from workers.generator import Generator
from workers.group import rank_name
from workers.messages import StreamAssignment, WorkerSettings
from workers.types import StreamSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def reference_state(spec: StreamSpec, chunks: int) -> bytes:
    gen = Generator(TINY)
    state = gen.new_stream(spec)
    for _ in range(chunks):
        gen.step([state])
    return state.to_bytes()[0]


def test_two_rank_group_equals_single_process_and_hands_its_stream_to_a_single_worker(ray_session, tmp_path):
    out = tmp_path / "run"
    settings = WorkerSettings(out_dir=str(out), model=TINY.to_dict(), checkpoint_every=4, segment_chunks=2,
                              upscale=UPSCALE, group_size=2, preview_every_s=None)  # fmt: skip
    spec = StreamSpec("s0", seed=5)
    group = spawn_worker("g0", settings, use_gpu=False, worker_cpus=1.0)
    single = spawn_worker("w1", replace(settings, group_size=1), use_gpu=False, worker_cpus=1.0)
    try:
        ray.get(group.assign.remote(StreamAssignment(spec, 10)), timeout=120)
        for _ in range(5):
            ray.get(group.step.remote(), timeout=120)
        pids = ray.get(group.rank_pids.remote())
        assert len(set(pids)) == 2  # two processes
        handoffs = ray.get(group.export_streams.remote(["s0"]), timeout=120)
        assert [h.stream_id for h in handoffs] == ["s0"]
        # the group's gathered state is the single-process state, byte for byte (cache rows included)
        assert ray.get(handoffs[0].payload) == reference_state(spec, 5)
        (a,) = ray.get(single.import_streams.remote(handoffs), timeout=120)
        assert (a.start_chunk, a.checkpoint) == (5, 4)
        while ray.get(single.step.remote(), timeout=120).chunks:
            pass
    finally:
        for h in (group, single):
            ray.kill(h, no_restart=True)
        remove_worker("g0")
    # the move wrote no checkpoint: only the scheduled ones (every 4 chunks, and at the end) exist
    ckpts = sorted(int(p.name) for p in (out / "streams" / "s0" / "checkpoints").iterdir())
    assert ckpts == [4, 8, 10], ckpts
    run = RunSpec(out_dir=str(out), model=TINY.to_dict(), streams=[StreamEntry(spec, 10)], upscale=UPSCALE)
    check_outputs(run, tmp_path)  # every chunk once, frames equal to the uninterrupted reference


def test_sigkill_one_rank_of_a_group_tears_it_down_and_streams_resume_identical(ray_session, tmp_path):
    spec = make_run(tmp_path / "run", n_streams=2, chunks=12, workers=1, seed=30)
    spec.group_size = 2
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 1 and min(s.next_chunk for s in p.streams) >= 5,
                     what="every stream past chunk 5")  # fmt: skip
        victim = p.workers[0]
        rank1 = ray.get_actor(rank_name(victim.worker_id, 1), namespace=NAMESPACE)
        os.kill(ray.get(rank1.pid.remote(), timeout=30), signal.SIGKILL)
        t0 = time.monotonic()
        p = wait_for(orch, lambda p: p.state == "done", what="run done")
    finally:
        ray.kill(orch, no_restart=True)
    assert [r.worker_id for r in p.recoveries] == [victim.worker_id], p.recoveries
    assert p.recoveries[0].resumed_at is not None
    assert p.recoveries[0].resumed_at - p.recoveries[0].lost_at < 60, "rank loss took too long to notice"
    lost = [e for e in events(tmp_path / "run") if e["event"] == "worker.lost"]
    assert len(lost) == 1 and set(lost[0]["streams"]) == {"s0", "s1"}
    assert not [e for e in events(tmp_path / "run") if e["event"] == "worker.step_failed"]
    print(f"rank killed -> run done in {time.monotonic() - t0:.1f} s")
    check_outputs(spec, tmp_path)


def test_rebalance_moves_streams_directly_and_frames_stay_identical(ray_session, tmp_path):
    spec = make_run(tmp_path / "run", n_streams=3, chunks=60, workers=2, seed=40)  # outlasts a replacement's start
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 2 and min(s.next_chunk for s in p.streams) >= 3,
                     what="every stream past chunk 3")  # fmt: skip
        victim = max(p.workers, key=lambda w: len(w.stream_ids))
        os.kill(victim.pid, signal.SIGKILL)  # survivor takes every stream; the replacement gets a share
        p = wait_for(orch, lambda p: p.state == "done", what="run done")
    finally:
        ray.kill(orch, no_restart=True)
    evs = events(tmp_path / "run")
    moved = [e for e in evs if e["event"] == "stream.moved"]
    assert moved and all(e.get("how") == "direct" and e["bytes"] > 0 for e in moved), moved
    assert not [e for e in evs if e["event"] == "stream.move_fallback"]
    print("moves:", json.dumps([(e["stream_id"], e["chunk_index"], e["seconds"]) for e in moved]))
    check_outputs(spec, tmp_path)
