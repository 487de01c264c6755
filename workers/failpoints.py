"""Named crash points for tests of recovery: ``LONGROLL_FAILPOINTS=name[,name...]`` in a worker's
environment makes :func:`failpoint` SIGKILL the process there (a crash at exactly that moment).

The variable reaches Ray actors through the driver's runtime_env (every ``LONGROLL_*`` variable). With
it unset, a failpoint is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

import structlog

log = structlog.get_logger(__name__)


def failpoint(name: str) -> None:
    """SIGKILL this process if ``name`` is listed in LONGROLL_FAILPOINTS."""
    armed = os.environ.get("LONGROLL_FAILPOINTS")
    if armed and name in armed.split(","):
        log.warning("failpoint.hit", name=name, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
