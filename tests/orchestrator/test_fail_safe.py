"""Runtime faults end a run failed with its reason, within a bounded time, on a real Ray: a worker that
dies again and again on one stream, a hung step, a stray segment that straddles the checkpoint, a
directory that turns read-only mid-run (a read-only bind mount), a second orchestrator on a live directory."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import ray

from orchestrator.actor import start_orchestrator
from orchestrator.registry import RunSpec, StreamEntry
from orchestrator.run_dir import partial_files
from orchestrator.run_lock import read_lock
from tests.orchestrator.test_recovery import events, make_run, wait_for
from workers.config import ModelConfig
from workers.types import StreamSpec

pytestmark = pytest.mark.slow
TINY = ModelConfig.from_name("tiny")
FINAL = ("done", "stopped", "failed")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_to_end(spec: RunSpec, timeout: float = 240):
    orch = start_orchestrator(spec.out_dir)
    try:
        return wait_for(orch, lambda p: p.state in FINAL, timeout=timeout, what="the run to end")
    finally:
        ray.kill(orch, no_restart=True)


def stub_run(out: Path, prompts: dict[str, str], chunks: int | None = 20, **kw) -> RunSpec:
    streams = [StreamEntry(StreamSpec(sid, prompt=prompt), chunks) for sid, prompt in prompts.items()]
    spec = RunSpec(out_dir=str(out.resolve()), model=TINY.to_dict(), streams=streams, workers=2,
                   streams_per_worker=1, stub=True, **kw)  # fmt: skip
    spec.save()
    return spec


def test_a_worker_dying_three_times_in_a_row_on_one_stream_fails_it(ray_session, tmp_path):
    spec = stub_run(tmp_path / "run", {"ok": "", "bad": "die-at:3"})
    p = run_to_end(spec)
    assert p.state == "failed" and {s.stream_id: s.state for s in p.streams} == {"ok": "done", "bad": "failed"}
    lost = [e for e in events(tmp_path / "run") if e["event"] == "worker.lost" and e["streams"] == ["bad"]]
    assert len(lost) == 3, lost
    assert "streams ['bad'] failed" in p.fatal, p.fatal
    saved = RunSpec.load(spec.out_dir)
    assert saved.state == "failed" and saved.error == p.fatal
    assert read_lock(spec.out_dir) is None, "the lock outlived the run"


def test_a_hung_step_fails_the_run_after_the_stall_timeout(ray_session, tmp_path):
    spec = stub_run(tmp_path / "run", {"ok": "", "hang": "hang-at:2"}, chunks=None, stall_timeout_s=5.0)
    t0 = time.monotonic()
    p = run_to_end(spec, timeout=120)
    took = time.monotonic() - t0
    print(f"hung step detected and the run ended in {took:.1f} s (stall timeout 5 s)")
    assert p.state == "failed" and "has not returned for" in p.fatal and "['hang']" in p.fatal, p.fatal
    assert {s.state for s in p.streams} == {"failed"}
    assert any(e["event"] == "run.fatal" for e in events(tmp_path / "run"))


def test_a_stray_segment_straddling_the_checkpoint_fails_the_stream_with_its_reason(ray_session, tmp_path):
    out = tmp_path / "run"
    spec = make_run(out, n_streams=1, chunks=4, workers=1, checkpoint_every=4, segment_chunks=2, seed=70)
    assert run_to_end(spec).state == "done"
    seg = out / "streams" / "s0" / "segments"
    shutil.copy(seg / "00000002-00000003.mp4", seg / "00000003-00000005.mp4")  # straddles checkpoint 4
    m = json.loads((out / "streams" / "s0" / "manifest.json").read_text())
    (out / "streams" / "s0" / "manifest.json").write_text(json.dumps({**m, "state": "running"}))
    spec.state = "running"
    spec.save()
    p = run_to_end(spec)
    assert p.state == "failed" and "straddles checkpoint 4" in p.fatal, p.fatal
    assert sum(e["event"] == "stream.assign_failed" for e in events(out)) == 3


def bind_read_only(path: Path) -> None:
    """Make ``path`` read-only from now on: a read-only bind mount over itself (descriptors already open
    for writing keep working, as on a real remount). Skips, with the reason, where mounting is impossible."""
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)


def test_a_directory_turned_read_only_mid_run_fails_the_run_at_once(ray_session, tmp_path):
    out = tmp_path / "run"
    spec = make_run(out, n_streams=2, chunks=400, workers=2, checkpoint_every=2, segment_chunks=2, seed=80)
    orch = start_orchestrator(spec.out_dir)
    mounted = False
    try:
        wait_for(orch, lambda p: min(s.next_chunk for s in p.streams) >= 3, what="chunk 3")
        bind_read_only(out)
        mounted = True
        t0 = time.monotonic()
        p = wait_for(orch, lambda p: p.state in FINAL, timeout=120, what="the run to fail")
        print(f"read-only directory: the run failed {time.monotonic() - t0:.1f} s after the remount")
    finally:
        ray.kill(orch, no_restart=True)
        if mounted:
            subprocess.run(["umount", "-l", str(out)], check=False)
    assert p.state == "failed" and "Read-only file system" in p.fatal, p.fatal
    assert max(s.next_chunk for s in p.streams) < 400


def test_an_orchestrator_on_a_live_directory_ends_without_writing(ray_session, tmp_path):
    out = tmp_path / "run"
    spec = stub_run(out, {"a": ""}, chunks=None)
    from orchestrator.run_lock import acquire, new_token, release

    token = new_token()
    acquire(spec.out_dir, token, "driver")  # this process holds it (alive: the lock is live)
    before = sorted(p.name for p in out.iterdir())
    try:
        p = run_to_end(spec, timeout=60)
        assert sorted(p.name for p in out.iterdir()) == before, "an orchestrator without the lock wrote into DIR"
        assert read_lock(out).token == token
    finally:
        release(spec.out_dir, token)
    assert p.state == "failed" and "is live" in p.fatal, p.fatal
    assert RunSpec.load(out).state == "running"
    assert partial_files(out) == []
