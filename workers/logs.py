"""structlog setup for entry points (the CLI, Ray actors). Libraries only call ``structlog.get_logger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _StderrLogger:
    """Prints each line to whatever ``sys.stderr`` is at that moment. structlog's PrintLogger keeps the
    stream it was made with, which breaks once that stream is replaced and closed (a test's capture)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*args) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """JSON lines on stderr (services) or a console renderer (interactive CLI).

    ``LONGROLL_LOG_FORMAT`` (json|console) and ``LONGROLL_LOG_LEVEL`` override the arguments.
    """
    fmt = os.environ.get("LONGROLL_LOG_FORMAT", fmt or "json")
    level_name = os.environ.get("LONGROLL_LOG_LEVEL", level or "info").upper()
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
