"""DIR/run.lock: exclusive, refreshed by a heartbeat, taken over only when stale, by one process at most."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from orchestrator import run_lock
from orchestrator.run_lock import Heartbeat, RunLocked, acquire, is_stale, read_lock, release, touch


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    acquire(tmp_path, "a" * 32, "driver")
    with pytest.raises(RunLocked, match=rf"is live: its run is held by driver pid {os.getpid()} on "):
        acquire(tmp_path, "b" * 32, "driver")
    acquire(tmp_path, "a" * 32, "orchestrator")  # the same token: adopted, this process named twice
    info = read_lock(tmp_path)
    assert info.token == "a" * 32 and set(info.holders) == {"driver", "orchestrator"}
    release(tmp_path, "b" * 32)  # not its lock: nothing happens
    assert read_lock(tmp_path) is not None
    release(tmp_path, "a" * 32)
    assert read_lock(tmp_path) is None


def test_a_lock_whose_holders_died_on_this_host_is_taken_over_at_once(tmp_path):
    (tmp_path / "run.lock").write_text(
        json.dumps({"token": "old", "holders": {"driver": [socket.gethostname(), dead_pid()]}, "created_at": 0})
    )
    assert is_stale(read_lock(tmp_path))
    taken = acquire(tmp_path, "new", "driver")
    assert taken is not None and taken.token == "old" and read_lock(tmp_path).token == "new"


def test_a_lock_held_elsewhere_is_stale_only_when_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGROLL_LOCK_STALE_S", "5")
    (tmp_path / "run.lock").write_text(
        json.dumps({"token": "far", "holders": {"orchestrator": ["another-host", 1]}, "created_at": 0})
    )
    with pytest.raises(RunLocked, match="orchestrator pid 1 on another-host"):
        acquire(tmp_path, "new", "driver")
    old = time.time() - 6
    os.utime(tmp_path / "run.lock", (old, old))  # no heartbeat for 6 s
    assert acquire(tmp_path, "new", "driver").token == "far"


def test_a_lock_cut_short_while_written_is_stale_by_its_age(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGROLL_LOCK_STALE_S", "5")
    (tmp_path / "run.lock").write_text('{"tok')
    with pytest.raises(RunLocked):
        acquire(tmp_path, "new", "driver")
    old = time.time() - 6
    os.utime(tmp_path / "run.lock", (old, old))
    acquire(tmp_path, "new", "driver")
    assert read_lock(tmp_path).token == "new"


def _take(out_dir: str, token: str, start, results) -> None:
    start.wait()
    try:
        acquire(out_dir, token, "driver")
        results.put(token)
    except RunLocked:
        results.put(None)


def test_two_processes_taking_over_one_stale_lock_only_one_wins(tmp_path):
    ctx = mp.get_context("spawn")
    for round_ in range(3):
        d = tmp_path / f"r{round_}"
        d.mkdir()
        (d / "run.lock").write_text(
            json.dumps({"token": "old", "holders": {"driver": [socket.gethostname(), dead_pid()]}, "created_at": 0})
        )
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(str(d), f"t{i}", start, results)) for i in range(4)]
        for p in procs:
            p.start()
        start.set()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        winners = [t for t in got if t is not None]
        assert len(winners) == 1, got
        assert read_lock(d).token == winners[0]


def test_the_heartbeat_keeps_the_lock_fresh_and_reports_losing_it(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    acquire(tmp_path, "mine", "orchestrator")
    old = time.time() - 100
    os.utime(tmp_path / "run.lock", (old, old))
    lost = []
    beat = Heartbeat(tmp_path, "mine", on_lost=lost.append).start()
    deadline = time.monotonic() + 30
    while read_lock(tmp_path).age_s > 50 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_lock(tmp_path).age_s < 50, "the heartbeat did not touch the lock"
    release(tmp_path, "mine")
    acquire(tmp_path, "theirs", "driver")  # taken by another run meanwhile
    while not lost and time.monotonic() < deadline:
        time.sleep(0.02)
    beat.stop()
    assert lost and "another run took it over" in lost[0]
    assert not touch(tmp_path, "mine") and read_lock(tmp_path).token == "theirs"
