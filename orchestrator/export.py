"""`longroll export`: join one stream's segments of a run into a single file.

An mp4 stream's segments join into ``FILE.mp4`` without re-encoding: their packets are copied into
one file (workers.video.remux_mp4), so it decodes to exactly the segments' frames. Segments that
do not share codec parameters (some written before an encoding change) are decoded and re-encoded
instead (x264 crf 18: lossy), with a ``warning:`` line on stderr. ``--latents`` exports the
stream's latents instead, into ``FILE.safetensors``: a decoded stream's latent sidecars (written
when the run kept latents; every segment must have one) or a latent stream's segments.
A latent stream's (``*.safetensors`` segments, see
workers.output) into ``FILE.safetensors`` holding one tensor ``latents`` ``[F, C, H, W]`` float32,
with metadata ``stream_id``, ``first_chunk``, ``last_chunk`` and ``frames_per_chunk``. The segments
must cover a contiguous chunk range from chunk 0 (or from the oldest kept segment when the run
dropped old ones with --keep-segments); otherwise, or when FILE's suffix does not fit the stream,
the command fails with exit 2 before writing anything.

Every segment joined is first checked against the size and sha256 its manifest entry recorded
(orchestrator.integrity; entries from before checksums are joined unverified). A damaged segment
fails the command with exit 2 before anything is written: the convention this command already
follows for a run directory whose segments are missing or unreadable. FILE must lie outside the run
directory (symlinks resolved), so an export can never overwrite the run's own segments or manifests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.cli_common import UsageError
from orchestrator.generate import check_output_path
from orchestrator.integrity import verify_segment
from orchestrator.resume import check_ids, load_run
from workers.latent_segments import join_latent_segments, read_segment_info
from workers.output import KIND_OF_SUFFIX, SUFFIXES
from workers.video import Mp4Writer, ParamsDiffer, read_mp4, remux_mp4


def register(sub) -> None:
    p = sub.add_parser("export", help="join one stream's segments into a single .mp4 (or .safetensors of latents)")
    p.add_argument("stream_id", metavar="STREAM_ID")
    p.add_argument("file", metavar="FILE", help="FILE.mp4 for a video stream, FILE.safetensors for a latent stream")
    p.add_argument("--out", default="out/run", help="output directory of the run (default out/run)")
    p.add_argument(
        "--latents",
        action="store_true",
        help="export the stream's latents (FILE.safetensors): a decoded stream's latent sidecars",
    )
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


def _checked_sidecars(sid: str, stream_dir: Path, m: dict) -> tuple[list[Path], list[dict]]:
    """(sidecar paths in chunk order, their entries to verify); UsageError unless every segment has one."""
    segs = sorted(m["segments"], key=lambda s: s["first"])
    without = [s["file"] for s in segs if not s.get("latents")]
    if without:
        raise UsageError(f"stream {sid}: segments without a latent sidecar (the run did not keep latents): {without}")
    paths = [stream_dir / s["latents"] for s in segs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"stream {sid}: latent sidecars missing: {missing}")
    entries = [{"file": s["latents"], "bytes": s.get("latents_bytes"), "sha256": s.get("latents_sha256")} for s in segs]
    return paths, entries


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


def _check_outside_run(file: str, run_dir: str) -> None:
    """UsageError if FILE (symlinks resolved) lies inside the run directory: it could replace a segment."""
    out, run = Path(file).resolve(), Path(run_dir).resolve()
    if out.is_relative_to(run):
        raise UsageError(f"output file {file} is inside the run directory {run}: write it somewhere else")


def _verify_segments(sid: str, stream_dir: Path, entries: list[dict]) -> None:
    """UsageError naming every file joined whose size or sha256 differs from its manifest entry."""
    problems = [p for e in entries if (p := verify_segment(stream_dir, e)) is not None]
    if problems:
        raise UsageError(f"stream {sid}: damaged segments, not exported: {'; '.join(problems)}")


def run(args) -> int:
    spec = load_run(args.out)
    sid = args.stream_id
    check_ids(spec, [sid])
    _check_outside_run(args.file, spec.out_dir)
    m = spec.manifest(sid)
    if not m or not m.get("segments"):
        raise UsageError(f"stream {sid} has no segments yet")
    stream_dir = spec.stream_dir(sid)
    kind, paths, first, last = _checked_segments(sid, stream_dir, m)
    # what is joined is what is verified: the mp4s without their sidecars, or the sidecars alone
    entries = [{k: v for k, v in e.items() if not k.startswith("latents")} for e in m["segments"]]
    if getattr(args, "latents", False) and kind == "mp4":
        paths, entries = _checked_sidecars(sid, stream_dir, m)
        kind, what = "latents", "latent sidecars"
    else:
        what = f"{kind} segments"
    suffix = SUFFIXES[kind]
    if Path(args.file).suffix.lower() != suffix:
        raise UsageError(f"stream {sid} has {what}: output file must end in {suffix}: {args.file}")
    path = check_output_path(args.file, suffix=suffix)
    fpc = _check_latent_segments(sid, paths, first, last) if kind == "latents" else 0
    _verify_segments(sid, stream_dir, entries)
    if kind == "mp4":
        try:
            n = remux_mp4(paths, path)
        except ParamsDiffer as e:  # segments from before an encoding change: decode and re-encode
            print(f"warning: stream {sid}: {e}: cannot join without re-encoding; re-encoding (lossy)", file=sys.stderr)
            with Mp4Writer(path, fps=m["fps"]) as w:
                for p in paths:
                    w.write(read_mp4(p))
            n = w.frames_written
        print(f"wrote {path}: {n} frames of {sid} (chunks {first}..{last})")
        return 0
    meta = {"stream_id": sid, "first_chunk": str(first), "last_chunk": str(last), "frames_per_chunk": str(fpc)}
    shape = join_latent_segments(paths, path, meta)
    print(f"wrote {path}: latents {list(shape)} of {sid} (chunks {first}..{last})")
    return 0
