"""Housekeeping of a run directory by the process that holds its lock (orchestrator.run_lock).

Every file is committed by a rename from a hidden temporary in the same directory, so what a killed
or interrupted writer leaves behind is only those temporaries (and the last line of events.jsonl, cut
mid-write). Whoever holds the lock removes them on start and at the end: nothing else writes then.
The memory store (``DIR/memory``, LanceDB's own files) is never touched here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

EVENTS_FILE = "events.jsonl"
# hidden temporaries of the atomic writers (workers.durable: `.name.tmp-<pid>-<hex>`; an open segment
# `.open-<chunk>.mp4` and its encoder's own temp), and checkpoint files `state.safetensors.tmp-<hex>`
# written beside their target through pyarrow.fs
_PARTIAL = re.compile(r"^\.(open-|.*\.tmp)|\.tmp-[0-9a-f]{8}$")
_SKIP_DIRS = {"memory"}


def partial_files(out_dir: str | os.PathLike) -> list[Path]:
    """Temporaries of interrupted writes under ``out_dir`` (outside the memory store)."""
    root = Path(out_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found += [Path(dirpath) / f for f in filenames if _PARTIAL.search(f)]
    return sorted(found)


def sweep_partial_files(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of interrupted writes; returns what was removed. Only under the lock."""
    removed = []
    for p in partial_files(out_dir):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.info("run_dir.swept", files=[str(p.relative_to(out_dir)) for p in removed])
    return removed


def repair_events(out_dir: str | os.PathLike) -> bool:
    """Cut a last events.jsonl line that a killed writer left unfinished. Returns True if it cut one."""
    path = Path(out_dir) / EVENTS_FILE
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return False
            f.truncate(data.rfind(b"\n") + 1)
            return True
    except FileNotFoundError:
        return False


def append_event(out_dir: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write(2) on an O_APPEND descriptor: lines never interleave."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(Path(out_dir) / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
