"""`longroll status`: a run's state from its output directory (no Ray needed)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from orchestrator.registry import pending_stops
from orchestrator.resume import load_run
from orchestrator.run_lock import is_stale, read_lock


def register(sub) -> None:
    p = sub.add_parser("status", help="state of a run's streams, read from its output directory")
    p.add_argument("--out", default="out/run", help="output directory of the run (default out/run)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def collect(out: str) -> dict:
    spec = load_run(out)
    streams = []
    for e in spec.streams:
        m = spec.manifest(e.spec.stream_id) or {}
        streams.append(
            {
                "stream_id": e.spec.stream_id,
                "state": m.get("state", "pending"),
                "chunks_done": m.get("chunks_done", 0),
                "target_chunks": e.target_chunks,
                "frames_done": m.get("frames_done", 0),
                "fps": m.get("fps"),
                "last_checkpoint": m.get("last_checkpoint"),
                "segments": len(m.get("segments", [])),
            }
        )
    stops = pending_stops(spec.out_dir)
    dashboard = None
    if spec.state == "running":  # where its orchestrator said it serves the dashboard (no secret in that file)
        with contextlib.suppress(OSError, ValueError):
            dashboard = json.loads((Path(spec.out_dir) / "dashboard.json").read_text())["url"]
    info = read_lock(spec.out_dir)
    lock = None
    if info is not None:
        lock = {
            "live": not is_stale(info),
            "holders": {role: {"host": h, "pid": pid} for role, (h, pid) in info.holders.items()},
            "heartbeat_age_s": round(info.age_s, 1),
        }
    return {
        "out": spec.out_dir,
        "state": spec.state,
        "error": spec.error,
        "lock": lock,
        "streams": streams,
        "stop_requested": "all" if stops is None else sorted(stops),
        "dashboard": dashboard,
    }


def run(args) -> int:
    s = collect(args.out)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"run {s['out']}: {s['state']}" + (f" (dashboard {s['dashboard']})" if s["dashboard"] else ""))
    if s["error"]:
        print(f"error: {s['error']}")
    if s["lock"] is not None:
        lk = s["lock"]
        who = ", ".join(f"{r} pid {h['pid']} on {h['host']}" for r, h in sorted(lk["holders"].items()))
        kind = "live" if lk["live"] else "stale (the next run or resume takes it over)"
        print(f"lock: {kind}, held by {who or 'unknown'}, heartbeat {lk['heartbeat_age_s']} s ago")
    print(f"{'stream':<20} {'state':<9} {'chunks':>13} {'frames':>8} {'checkpoint':>10} {'segments':>8}")
    for r in s["streams"]:
        target = "inf" if r["target_chunks"] is None else r["target_chunks"]
        ckpt = "-" if r["last_checkpoint"] is None else r["last_checkpoint"]
        print(
            f"{r['stream_id']:<20} {r['state']:<9} {str(r['chunks_done']) + '/' + str(target):>13} "
            f"{r['frames_done']:>8} {ckpt:>10} {r['segments']:>8}"
        )
    return 0
