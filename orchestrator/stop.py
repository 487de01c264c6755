"""`longroll stop`: ask the run's orchestrator to checkpoint and stop streams (a file request in DIR/control)."""

from __future__ import annotations

from orchestrator.cli_common import UsageError
from orchestrator.registry import request_stop
from orchestrator.resume import check_ids, load_run


def register(sub) -> None:
    p = sub.add_parser("stop", help="checkpoint and stop streams of a run (resume them with `longroll resume`)")
    p.add_argument("stream_ids", nargs="*", metavar="STREAM_ID", help="streams to stop")
    p.add_argument("--all", action="store_true", help="stop every stream")
    p.add_argument("--out", default="out/run", help="output directory of the run (default out/run)")
    p.set_defaults(func=run)


def run(args) -> int:
    if bool(args.stream_ids) == bool(args.all):
        raise UsageError("give stream ids or --all (not both)")
    spec = load_run(args.out)
    check_ids(spec, args.stream_ids)
    request_stop(spec.out_dir, None if args.all else args.stream_ids)
    what = "every stream" if args.all else ", ".join(args.stream_ids)
    print(f"stop requested for {what}; the orchestrator checkpoints them after their current chunk")
    return 0
