"""The `longroll` command line. Contract: exit 0 on success, 2 on bad input (one `error: ...` line
on stderr, nothing half-written), 1 on a runtime failure.

Each subcommand lives in its own module with ``register(subparsers)`` (which sets ``func``) and a
``run(args) -> int``; this file only assembles them.
"""

from __future__ import annotations

import os
import sys

from orchestrator import convert_weights as convert_weights_cmd
from orchestrator import export as export_cmd
from orchestrator import generate, plan
from orchestrator import resume as resume_cmd
from orchestrator import run as run_cmd
from orchestrator import status as status_cmd
from orchestrator import stop as stop_cmd
from orchestrator import submit as submit_cmd
from orchestrator import train_embedder as train_embedder_cmd
from orchestrator import train_world as train_world_cmd
from orchestrator.cli_common import Parser, UsageError
from workers.logs import configure_logging

COMMANDS = [
    generate,
    plan,
    run_cmd,
    submit_cmd,
    status_cmd,
    stop_cmd,
    resume_cmd,
    export_cmd,
    train_embedder_cmd,
    train_world_cmd,
    convert_weights_cmd,
]


def build_parser() -> Parser:
    parser = Parser(prog="longroll", description="Day-scale autoregressive video rollouts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(fmt="console" if sys.stderr.isatty() else "json", level="warning")
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`longroll status | head`): not a failure of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not raise
        return 0
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
