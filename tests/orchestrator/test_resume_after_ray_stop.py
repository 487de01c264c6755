"""`longroll run --address` on a `ray start` cluster; the whole cluster is killed mid-run; a new cluster
is started and `longroll resume --address ...` finishes the run with output identical to an
uninterrupted one.

The cluster is stopped by killing the process group of its `ray start --block` (what `ray stop
--force` does to one machine's Ray, without touching any other Ray cluster on the same machine).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.registry import RunSpec
from tests.orchestrator.test_recovery import check_outputs, events

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(tmp_path / f"ray-{port}.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
             "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in (tmp_path / f"ray-{port}.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / f"ray-{port}.log").read_text()
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port}"


def kill_cluster(proc: subprocess.Popen, worker_pids: list[int]) -> None:
    """SIGKILL the cluster's process group, then any of its worker processes still alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in worker_pids):
        time.sleep(0.5)
    for p in worker_pids:  # ray workers exit by themselves once their raylet is gone; make sure
        if psutil.pid_exists(p):
            os.kill(p, signal.SIGKILL)


def longroll(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_resume_after_the_whole_cluster_was_stopped(tmp_path):
    out = tmp_path / "run"
    cluster, address = start_cluster(tmp_path)
    driver = None
    try:
        driver = longroll("run", "--address", address, "--streams", "2", "--seed", "40", "--chunks", "32",
                          "--workers", "2", "--checkpoint-every", "4", "--segment-chunks", "2", "--upscale", "2",
                          "--out", str(out), "--quiet")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until every stream has a checkpoint past 0 but none is done
            ms = [json.loads(p.read_text()) for p in out.glob("streams/*/manifest.json")]
            if len(ms) == 2 and all((m["last_checkpoint"] or 0) >= 4 for m in ms):
                break
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.2)
        else:
            raise AssertionError("no checkpoints within 180 s")
        driver.kill()
        driver.wait()
        pids = [e["pid"] for e in events(out) if e["event"] == "worker.ready"]
        kill_cluster(cluster, pids)
        ms = [json.loads(p.read_text()) for p in out.glob("streams/*/manifest.json")]
        assert any(m["state"] != "done" for m in ms), "the run finished before the cluster was stopped"

        cluster, address = start_cluster(tmp_path)
        resumed = longroll("resume", "--address", address, "--out", str(out), "--quiet")
        stdout, stderr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, stderr
        assert stdout.splitlines()[-1].startswith("done: 2 streams"), stdout
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        kill_cluster(cluster, [])
    starts = [e for e in events(out) if e["event"] == "stream.assigned"]
    assert any(e["checkpoint"] for e in starts), "the resumed streams should start from checkpoints"
    check_outputs(RunSpec.load(out), tmp_path)
