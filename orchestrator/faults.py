"""Which failures end a run at once: faults of the environment that no retry can fix.

A full disk, a read-only or permission-denied directory, an exceeded quota: every worker would hit
the same wall again, so the orchestrator stops the run with one clear error instead of respawning
workers in a loop. Everything else (a killed process, a raising step) is retried from checkpoints a
bounded number of times (orchestrator.actor.MAX_STEP_FAILURES).
"""

from __future__ import annotations

import errno
import os

FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# the same faults as text: Rust code (LanceDB) and subprocesses (ffmpeg) report them as strings
FATAL_TEXT = tuple(os.strerror(e) for e in sorted(FATAL_ERRNOS))


def _chain(err: BaseException):
    seen = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]  # RayTaskError keeps it in .cause


def environment_fault(err: BaseException) -> str | None:
    """A one-line description when ``err`` (or what caused it) is a fault of the environment, else None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in FATAL_ERRNOS:
            where = f": {e.filename}" if e.filename else ""
            return f"{os.strerror(e.errno)}{where}"
    text = str(err)
    for phrase in FATAL_TEXT:
        if phrase.lower() in text.lower():
            line = next((ln.strip() for ln in text.splitlines() if phrase.lower() in ln.lower()), phrase)
            return line[-300:]
    return None
