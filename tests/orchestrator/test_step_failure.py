"""A step that raises (not a dead process) is retried from checkpoints a bounded number of times,
then its stream is marked failed while the others finish."""

import json
import time

import pytest
import ray

from orchestrator.actor import start_orchestrator
from orchestrator.registry import RunSpec, StreamEntry
from workers.config import ModelConfig
from workers.types import StreamSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_stream_whose_step_keeps_raising_is_marked_failed(ray_session, tmp_path):
    out = tmp_path / "run"
    streams = [
        StreamEntry(StreamSpec("ok", prompt=""), 20),
        StreamEntry(StreamSpec("bad", prompt="raise-at:3"), 20),
    ]
    spec = RunSpec(out_dir=str(out.resolve()), model=ModelConfig.from_name("tiny").to_dict(), streams=streams,
                   workers=2, streams_per_worker=1, stub=True)  # fmt: skip
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            p = ray.get(orch.progress.remote(), timeout=30)
            if p.state in ("done", "stopped", "failed"):
                break
            time.sleep(0.2)
    finally:
        ray.kill(orch, no_restart=True)
    assert p.state == "failed", p.state
    states = {s.stream_id: s.state for s in p.streams}
    assert states == {"ok": "done", "bad": "failed"}, states
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    failed_steps = [e for e in events if e["event"] == "worker.step_failed"]
    assert len(failed_steps) == 3 and all("injected failure" in e["error"] for e in failed_steps)
    assert [e["stream_id"] for e in events if e["event"] == "stream.failed"] == ["bad"]
    assert RunSpec.load(out).state == "failed"
