"""Regression: logging configured while sys.stderr was a since-closed stream (a CLI test's capture) must
keep working once sys.stderr is another stream (it raised 'I/O operation on closed file' in later tests)."""

import io
import sys

import structlog

from workers.logs import configure_logging


def test_logging_follows_the_current_stderr_not_the_one_configured_with(monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("json", "info")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("t").warning("after.close", stream_id="s0")
    assert '"event": "after.close"' in second.getvalue() and '"stream_id": "s0"' in second.getvalue()
