"""`longroll run`: many concurrent streams on Ray (embedded local Ray unless --address)."""

from __future__ import annotations

from orchestrator.driver import RunLock, connect, drive
from orchestrator.run_options import add_run_options, build_run_spec


def register(sub) -> None:
    p = sub.add_parser("run", help="run many concurrent streams on Ray workers, with checkpoints and recovery")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start an embedded local Ray)")
    add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true", help="forward the actors' JSON logs to this terminal")
    p.set_defaults(func=run)


def run(args) -> int:
    spec = build_run_spec(args)  # every UsageError before anything is written or started
    lock = RunLock(spec.out_dir)  # two `run`s racing for one directory: the second exits 2
    try:
        spec.save()
        connect(args.address, spec, verbose=args.verbose)
        return drive(spec, lock, quiet=args.quiet)
    finally:
        lock.release()
