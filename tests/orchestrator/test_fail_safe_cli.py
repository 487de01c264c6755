"""`longroll run` / `resume` as a user runs them, in subprocesses with their own embedded Ray:

- a crash exactly between a stream's final checkpoint and its manifest, and the same state left on disk
  for a later `resume` (it ran 360 chunks of a 30-chunk stream before), end at exactly the target;
- a second `resume` or `run` on a live directory exits 2; SIGTERM mid-segment leaves nothing half-written;
- a full disk (a 3 MB tmpfs) ends the run with exit 1 and one `error:` line soon after it fills.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.registry import RunSpec
from orchestrator.run_dir import partial_files
from orchestrator.run_lock import read_lock
from tests.orchestrator.test_recovery import check_outputs, events, reference_frames
from workers.video import read_mp4

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RUN = ["--workers", "2", "--checkpoint-every", "2", "--segment-chunks", "2", "--upscale", "2", "--no-dashboard"]


def longroll(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            **kw)  # fmt: skip


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def summary(stdout: str) -> str:
    """The run's last line (Ray's raylet may print its own notices to stdout too)."""
    return [ln for ln in stdout.splitlines() if not ln.startswith("\x1b[") and "(raylet)" not in ln][-1]


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def wait_until(pred, proc: subprocess.Popen, timeout: float = 240, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def manifests(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("streams/*/manifest.json")}


def test_streams_found_at_their_target_end_there(tmp_path):
    out = tmp_path / "run"
    # every worker is SIGKILLed right after a stream's final checkpoint, before its manifest says done
    code, stdout, stderr = finish(longroll("run", "--streams", "2", "--seed", "60", "--chunks", "4", *RUN,
                                           "--out", str(out), "--quiet",
                                           env={"LONGROLL_FAILPOINTS": "after-final-checkpoint"}))  # fmt: skip
    assert code == 0, stderr
    assert summary(stdout).startswith("done: 2 streams, 8 chunks"), stdout
    ev = events(out)
    assert any(e["event"] == "worker.lost" for e in ev), "the failpoint did not fire"
    assert any(e["event"] == "stream.done" and e.get("found_at_target") for e in ev)
    check_outputs(RunSpec.load(out), tmp_path)

    # the reported reproduction: a finished run whose run.json and one manifest still say "running"
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "state": "running"}))
    m = manifests(out)["s0"]
    (out / "streams/s0/manifest.json").write_text(json.dumps({**m, "state": "running", "chunks_done": 2}))
    code, stdout, stderr = finish(longroll("resume", "--out", str(out), "--quiet"), timeout=180)
    assert code == 0, stderr
    assert {sid: (m["state"], m["chunks_done"]) for sid, m in manifests(out).items()} == {
        "s0": ("done", 4), "s1": ("done", 4)}  # fmt: skip
    check_outputs(RunSpec.load(out), tmp_path)


def test_a_live_directory_refuses_resume_and_sigterm_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    args = ["--streams", "2", "--seed", "61", "--infinite", "--workers", "2", "--checkpoint-every", "8",
            "--segment-chunks", "8", "--upscale", "2", "--no-dashboard", "--out", str(out), "--quiet"]  # fmt: skip
    driver = longroll("run", *args)
    try:
        wait_until(lambda: (info := read_lock(out)) is not None and "orchestrator" in info.holders, driver,
                   what="the orchestrator to hold the lock")  # fmt: skip
        code, _, stderr = finish(longroll("resume", "--out", str(out)), timeout=60)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("error: ") and "is live" in stderr and "orchestrator pid" in stderr, stderr
        code, _, stderr = finish(longroll("run", *args), timeout=60)
        assert code == 2 and "already holds a run" in stderr, stderr
        # SIGTERM while a segment is open (its hidden file is being written)
        wait_until(lambda: list(out.glob("streams/*/segments/.*")) and
                   min((m.get("chunks_done", 0) for m in manifests(out).values()), default=0) >= 8, driver,
                   what="an open segment after the first checkpoint")  # fmt: skip
        driver.send_signal(signal.SIGTERM)
        code, _, stderr = finish(driver, timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert code == 1 and error_lines(stderr) == [f"error: interrupted; continue with `longroll resume --out {out}`"], \
        stderr  # fmt: skip
    assert partial_files(out) == [], "temporaries left behind"
    assert read_lock(out) is None, "the lock outlived the command"
    spec = RunSpec.load(out)
    for e in spec.streams:  # what was written is whole and exactly the uninterrupted stream's start
        m = spec.manifest(e.spec.stream_id)
        assert m["state"] == "stopped" and m["chunks_done"] >= 8, m
        covered = [c for s in m["segments"] for c in range(s["first"], s["last"] + 1)]
        assert covered == list(range(m["chunks_done"])), covered
        got = np.concatenate([read_mp4(spec.stream_dir(e.spec.stream_id) / s["file"]) for s in m["segments"]])
        want = reference_frames(e.spec, m["chunks_done"], tmp_path, spec.weights)
        assert np.array_equal(got, want), f"{e.spec.stream_id}: frames differ from an uninterrupted run"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (mount needs root or CAP_SYS_ADMIN; skipped, with the reason, without)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_ends_the_run_with_one_error_line(small_disk):
    out = small_disk / "run"
    seen_full: list[float] = []
    stop = threading.Event()

    def watch():  # under 1 MiB free (a checkpoint is ~0.7 MB): at or before the write that fails
        while not stop.wait(0.005):
            st = os.statvfs(small_disk)
            if st.f_bavail * st.f_frsize < 1024 * 1024:
                seen_full.append(time.monotonic())
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    args = ["--streams", "2", "--chunks", "20000", "--workers", "2", "--checkpoint-every", "2",
            "--segment-chunks", "2", "--upscale", "4", "--no-dashboard", "--out", str(out), "--quiet"]  # fmt: skip
    driver = longroll("run", *args)
    try:
        code, _, stderr = finish(driver, timeout=600)
        exited = time.monotonic()
    finally:
        stop.set()
        if driver.poll() is None:
            driver.kill()
    assert seen_full, "the disk never filled"
    print(f"full disk: exit {code} {exited - seen_full[0]:.1f} s after it filled")
    assert code == 1, stderr
    errs = error_lines(stderr)
    assert len(errs) == 1 and "No space left on device" in errs[0], stderr
    assert partial_files(out) == [], "temporaries left behind on the full disk"
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "failed" and "No space left on device" in run["error"]
    assert read_lock(out) is None
