"""`longroll export`: join one stream's segments of a run into a single mp4."""

from __future__ import annotations

from orchestrator.cli_common import UsageError
from orchestrator.generate import check_output_path
from orchestrator.resume import check_ids, load_run
from workers.video import Mp4Writer, read_mp4


def register(sub) -> None:
    p = sub.add_parser("export", help="join one stream's mp4 segments into a single file")
    p.add_argument("stream_id", metavar="STREAM_ID")
    p.add_argument("file", metavar="FILE.mp4")
    p.add_argument("--out", default="out/run", help="output directory of the run (default out/run)")
    p.set_defaults(func=run)


def run(args) -> int:
    spec = load_run(args.out)
    check_ids(spec, [args.stream_id])
    path = check_output_path(args.file)
    m = spec.manifest(args.stream_id)
    if not m or not m.get("segments"):
        raise UsageError(f"stream {args.stream_id} has no segments yet")
    with Mp4Writer(path, fps=m["fps"]) as w:
        for s in m["segments"]:
            w.write(read_mp4(spec.stream_dir(args.stream_id) / s["file"]))
    print(f"wrote {path}: {w.frames_written} frames of {args.stream_id} (chunks 0..{m['segments'][-1]['last']})")
    return 0
