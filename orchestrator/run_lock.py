"""One live run per output directory: ``DIR/run.lock``, kept fresh by a heartbeat.

The lock file is created exclusively (``O_CREAT | O_EXCL``) by whoever starts a run (the driver of
`run`/`resume`, or an Orchestrator started directly); its JSON names a token and the processes that
hold it (host and pid of the driver and of the orchestrator). Each holder touches the file every
``HEARTBEAT_S`` (its mtime is the heartbeat; no rewrite, so two holders never race). A lock is stale
when its heartbeat is older than ``stale_after_s()``, or at once when every holder it names ran on this
host and none is alive (a SIGKILLed cluster). A stale lock is taken over under a short-lived
``run.lock.takeover`` mutex, so two processes that both see it stale cannot both take it.

A flock would free itself when its process dies, but only on one machine: the run directory may be on
a shared file system that workers on several nodes write, so the lock is a file plus a heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOCK_FILE = "run.lock"
TAKEOVER_FILE = "run.lock.takeover"
HEARTBEAT_S = 2.0  # how often holders touch the lock
STALE_S = 30.0  # a heartbeat older than this means no live holder (override: LONGROLL_LOCK_STALE_S)
TAKEOVER_STALE_S = 10.0  # a takeover mutex left by a process that died mid-takeover


def stale_after_s() -> float:
    return float(os.environ.get("LONGROLL_LOCK_STALE_S", STALE_S))


class RunLocked(RuntimeError):
    """The directory's run is live (its lock is fresh), or the lock was taken by another run."""


@dataclass
class LockInfo:
    token: str
    holders: dict[str, list]  # role -> [host, pid]
    created_at: float
    heartbeat_at: float = 0.0  # the file's mtime
    extra: dict = field(default_factory=dict)

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat_at)

    def describe(self) -> str:
        who = ", ".join(f"{role} pid {pid} on {host}" for role, (host, pid) in sorted(self.holders.items()))
        return f"held by {who or 'an unknown process'}, heartbeat {self.age_s:.1f} s ago"


def _path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / LOCK_FILE


def new_token() -> str:
    return uuid.uuid4().hex


def read_lock(out_dir: str | os.PathLike) -> LockInfo | None:
    """The lock of ``out_dir`` (None when there is none). An unreadable lock file reads as token ''."""
    p = _path(out_dir)
    try:
        mtime = p.stat().st_mtime
        d = json.loads(p.read_text())
        return LockInfo(str(d["token"]), dict(d.get("holders", {})), float(d.get("created_at", 0)), mtime)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        with contextlib.suppress(OSError):
            return LockInfo("", {}, 0.0, p.stat().st_mtime)  # cut short while written: stale by heartbeat
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(info: LockInfo) -> bool:
    if info.age_s > stale_after_s():
        return True
    here = socket.gethostname()
    holders = list(info.holders.values())
    return bool(holders) and all(h == here and not _pid_alive(int(pid)) for h, pid in holders)


def _write_new(out_dir: str | os.PathLike, token: str, role: str) -> bool:
    """Create the lock exclusively; False if one exists. The file is whole before it is visible."""
    body = {"token": token, "holders": {role: [socket.gethostname(), os.getpid()]}, "created_at": time.time()}
    tmp = Path(out_dir) / f".{LOCK_FILE}.{token[:8]}.tmp"
    tmp.write_text(json.dumps(body))
    try:
        os.link(tmp, _path(out_dir))  # atomic and exclusive: fails if run.lock exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _takeover_mutex(out_dir: str | os.PathLike):
    p = Path(out_dir) / TAKEOVER_FILE
    try:
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > TAKEOVER_STALE_S:
                p.unlink()  # the next attempt may take it
        yield False
        return
    os.close(fd)
    try:
        yield True
    finally:
        p.unlink(missing_ok=True)


def acquire(out_dir: str | os.PathLike, token: str, role: str) -> LockInfo | None:
    """Hold the lock of ``out_dir`` with ``token``: create it, adopt it (same token), or take over a
    stale one. Returns the stale lock taken over (None otherwise). Raises RunLocked if it is live."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        if _write_new(out_dir, token, role):
            return None
        info = read_lock(out_dir)
        if info is None:
            continue  # released meanwhile
        if info.token == token:
            _add_holder(out_dir, role)
            return None
        if not is_stale(info):
            raise RunLocked(f"{out_dir} is live: its run is {info.describe()}")
        with _takeover_mutex(out_dir) as mine:
            now = read_lock(out_dir)
            if mine and now is not None and now.token == info.token and is_stale(now):
                _path(out_dir).unlink(missing_ok=True)
                if _write_new(out_dir, token, role):
                    return info
        time.sleep(0.05)  # another process is taking it over: look again
    raise RunLocked(f"{out_dir}: could not take over its stale lock")


def _add_holder(out_dir: str | os.PathLike, role: str) -> None:
    """Name this process in the lock (it holds it too). Rewrites the file whole; only on adoption."""
    p = _path(out_dir)
    d = json.loads(p.read_text())
    d.setdefault("holders", {})[role] = [socket.gethostname(), os.getpid()]
    tmp = p.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(d))
    os.replace(tmp, p)


def touch(out_dir: str | os.PathLike, token: str) -> bool:
    """Heartbeat. False when the lock is gone or holds another token (this run lost it)."""
    info = read_lock(out_dir)
    if info is None or info.token != token:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.utime(_path(out_dir))
        return True
    return False


def release(out_dir: str | os.PathLike, token: str) -> None:
    """Remove the lock if it is still this token's."""
    info = read_lock(out_dir)
    if info is not None and info.token == token:
        _path(out_dir).unlink(missing_ok=True)


class Heartbeat:
    """A daemon thread that touches the lock every HEARTBEAT_S; calls ``on_lost`` once if it is lost."""

    def __init__(self, out_dir: str | os.PathLike, token: str, on_lost: Callable[[str], None] | None = None):
        self.out_dir, self.token, self.on_lost = out_dir, token, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-lock-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                ok = touch(self.out_dir, self.token)
            except OSError:
                continue  # a transient error: the next beat retries; staleness needs STALE_S of these
            if not ok:
                info = read_lock(self.out_dir)
                why = "it was removed" if info is None else f"another run took it over ({info.describe()})"
                if self.on_lost is not None:
                    self.on_lost(f"this run lost the lock of {self.out_dir}: {why}")
                return

    def stop(self) -> None:
        self._stop.set()
