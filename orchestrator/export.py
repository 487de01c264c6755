"""`longroll export`: join one stream's segments of a run into a single file.

An mp4 stream's segments join into ``FILE.mp4``; a latent stream's (``*.safetensors`` segments, see
workers.output) into ``FILE.safetensors`` holding one tensor ``latents`` ``[F, C, H, W]`` float32,
with metadata ``stream_id``, ``first_chunk``, ``last_chunk`` and ``frames_per_chunk``. The segments
must cover a contiguous chunk range from chunk 0 (or from the oldest kept segment when the run
dropped old ones with --keep-segments); otherwise, or when FILE's suffix does not fit the stream,
the command fails with exit 2 before writing anything.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.cli_common import UsageError
from orchestrator.generate import check_output_path
from orchestrator.resume import check_ids, load_run
from workers.latent_segments import join_latent_segments, read_segment_info
from workers.output import KIND_OF_SUFFIX, SUFFIXES
from workers.video import Mp4Writer, read_mp4


def register(sub) -> None:
    p = sub.add_parser("export", help="join one stream's segments into a single .mp4 (or .safetensors of latents)")
    p.add_argument("stream_id", metavar="STREAM_ID")
    p.add_argument("file", metavar="FILE", help="FILE.mp4 for a video stream, FILE.safetensors for a latent stream")
    p.add_argument("--out", default="out/run", help="output directory of the run (default out/run)")
    p.set_defaults(func=run)


def _checked_segments(sid: str, stream_dir: Path, m: dict) -> tuple[str, list[Path], int, int]:
    """(kind, segment paths in chunk order, first chunk, last chunk); UsageError unless contiguous and present."""
    segs = sorted(m["segments"], key=lambda s: s["first"])
    kinds = {KIND_OF_SUFFIX.get(Path(s["file"]).suffix) for s in segs}
    if None in kinds or len(kinds) != 1:
        raise UsageError(f"stream {sid}: segments are not all of one known kind: {[s['file'] for s in segs]}")
    start = segs[0]["first"]
    if start != 0 and not m.get("dropped_segments"):
        raise UsageError(f"stream {sid}: chunks 0..{start - 1} have no segment")
    for a, b in zip(segs, segs[1:]):
        if b["first"] != a["last"] + 1:
            raise UsageError(f"stream {sid}: segments have a gap after chunk {a['last']} (next starts at {b['first']})")
    paths = [stream_dir / s["file"] for s in segs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"stream {sid}: segment files missing: {missing}")
    return kinds.pop(), paths, start, segs[-1]["last"]


def _check_latent_segments(sid: str, paths: list[Path], first: int, last: int) -> int:
    """frames_per_chunk of the segments; UsageError if a file is not the segment the manifest names."""
    infos = []
    for p in paths:
        try:
            infos.append(read_segment_info(p))
        except ValueError as e:
            raise UsageError(f"stream {sid}: {e}") from None
    ranges = [(i.first_chunk, i.last_chunk) for i in infos]
    if ranges[0][0] != first or ranges[-1][1] != last or any(b[0] != a[1] + 1 for a, b in zip(ranges, ranges[1:])):
        raise UsageError(f"stream {sid}: segment files' chunk ranges {ranges} do not match the manifest")
    if len({(i.frames_per_chunk, i.shape[1:]) for i in infos}) != 1:
        raise UsageError(f"stream {sid}: segments disagree on frames per chunk or [C, H, W]")
    return infos[0].frames_per_chunk


def run(args) -> int:
    spec = load_run(args.out)
    sid = args.stream_id
    check_ids(spec, [sid])
    m = spec.manifest(sid)
    if not m or not m.get("segments"):
        raise UsageError(f"stream {sid} has no segments yet")
    kind, paths, first, last = _checked_segments(sid, spec.stream_dir(sid), m)
    suffix = SUFFIXES[kind]
    if Path(args.file).suffix.lower() != suffix:
        raise UsageError(f"stream {sid} has {kind} segments: output file must end in {suffix}: {args.file}")
    path = check_output_path(args.file, suffix=suffix)
    if kind == "mp4":
        with Mp4Writer(path, fps=m["fps"]) as w:
            for p in paths:
                w.write(read_mp4(p))
        print(f"wrote {path}: {w.frames_written} frames of {sid} (chunks {first}..{last})")
        return 0
    fpc = _check_latent_segments(sid, paths, first, last)
    meta = {"stream_id": sid, "first_chunk": str(first), "last_chunk": str(last), "frames_per_chunk": str(fpc)}
    shape = join_latent_segments(paths, path, meta)
    print(f"wrote {path}: latents {list(shape)} of {sid} (chunks {first}..{last})")
    return 0
