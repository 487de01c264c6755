"""`longroll resume`: continue a stopped or crashed run from its output directory."""

from __future__ import annotations

from pathlib import Path

from orchestrator.cli_common import UsageError
from orchestrator.driver import RunLock, connect, drive
from orchestrator.integrity import check_resumable
from orchestrator.registry import RUN_FILE, RunSpec, clear_stops
from workers.output import write_json_atomic


def register(sub) -> None:
    p = sub.add_parser("resume", help="continue a stopped or crashed run (also after the Ray cluster restarted)")
    p.add_argument("stream_ids", nargs="*", metavar="STREAM_ID", help="streams to resume (default: all)")
    p.add_argument("--out", default="out/run", help="output directory of the run (default out/run)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start an embedded local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true", help="forward the actors' JSON logs to this terminal")
    p.set_defaults(func=run)


def load_run(out: str) -> RunSpec:
    if not (Path(out) / RUN_FILE).is_file():
        raise UsageError(f"no run in {out} (missing {RUN_FILE})")
    try:
        return RunSpec.load(out)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{out}/{RUN_FILE} is not a valid run: {e}") from None


def check_ids(spec: RunSpec, ids: list[str]) -> None:
    known = {e.spec.stream_id for e in spec.streams}
    unknown = [s for s in ids if s not in known]
    if unknown:
        raise UsageError(f"unknown stream ids {unknown}; this run has {sorted(known)}")


def prepare_resume(spec: RunSpec, stream_ids: list[str]) -> list[str]:
    """Clear stop requests and mark the selected stopped streams pending. Returns the streams left to run."""
    selected = stream_ids or [e.spec.stream_id for e in spec.streams]
    clear_stops(spec.out_dir, selected)
    todo = []
    for sid in selected:
        m = spec.manifest(sid)
        if m is not None and m.get("state") in ("stopped", "failed"):
            m["state"] = "pending"
            write_json_atomic(spec.stream_dir(sid) / "manifest.json", m)
        if m is None or m.get("state") != "done":
            todo.append(sid)
    if todo:
        spec.state, spec.error = "running", None
        spec.save()
    return todo


def run(args) -> int:
    spec = load_run(args.out)
    check_ids(spec, args.stream_ids)
    check_resumable(spec, args.stream_ids)  # damaged segments the resumed streams would keep: exit 2
    lock = RunLock(spec.out_dir)  # a live run (its orchestrator heartbeats the lock): exit 2, nothing touched
    try:
        if not prepare_resume(spec, args.stream_ids):
            print(f"nothing to resume: every selected stream of {spec.out_dir} is done")
            return 0
        connect(args.address, spec, verbose=args.verbose)
        return drive(spec, lock, quiet=args.quiet)
    finally:
        lock.release()
