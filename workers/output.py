"""Per-stream output: segments named by chunk range, and ``manifest.json``.

``DIR/streams/<id>/segments/<first:08d>-<last:08d>.mp4`` holds chunks first..last as video. A stream
whose chunks carry no decoded frames (``chunk.frames`` empty: a model family without a VAE decoder
yet) writes ``<first:08d>-<last:08d>.safetensors`` instead: one tensor ``latents`` ``[F_total, C, H, W]``
float32 with metadata ``first_chunk`` / ``last_chunk`` / ``frames_per_chunk`` (workers.latent_segments).
A stream's kind is decided by its first written chunk; the manifest's top-level ``"output"`` is
``"mp4"`` or ``"latents"`` (``null`` before any chunk), each segment entry's ``file`` carries the
suffix, and ``frames_per_chunk`` / ``frames_done`` count latent frames for a latent stream.

A decoded stream whose output is built with ``keep_latents=True`` also keeps each segment's
latents in a *sidecar* ``DIR/streams/<id>/latents/<first:08d>-<last:08d>.safetensors`` (the latent
segment format, chunks first..last), so the latents can be exported (``longroll export
--latents``) and a resumed stream can re-decode its last latent frames (workers.latent_segments
.read_latents). The sidecar is committed just before its mp4 (both through workers.durable); the
manifest entry of such a segment adds ``"latents": "latents/<name>.safetensors"`` and the sidecar's
own ``latents_sha256`` / ``latents_bytes`` beside the mp4's ``sha256`` / ``bytes``. A sidecar lives
and dies with its segment: start_at and ``keep_segments`` pruning drop both, and a sidecar whose mp4
is missing (a crash between the two commits) is dropped by start_at. ``lossless=True`` encodes the
mp4 segments losslessly in RGB (workers.video); the default is x264 ``yuv420p`` at ``crf``.

A segment is encoded into a hidden file and committed when it closes (fsync the file, rename it
under its chunk-range name, fsync the directory: workers.durable), so readers only ever see whole
segments, even after a power loss, and a segment regenerated after a recovery replaces its earlier
copy under the same name. Each manifest entry carries the committed file's ``sha256`` and ``bytes``
(orchestrator.integrity checks them); entries written before checksums existed have neither and
count as unverified. The manifest itself is committed the same durable way.
Segments close every ``segment_chunks`` chunks (aligned to multiples of it), at the stream's end and
when the stream is stopped or moved; checkpoints are only taken at those boundaries, so a stream
restarted from checkpoint ``c`` starts a fresh segment at ``c`` after deleting any segment at or past
``c`` (the lost tail, regenerated identically).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import structlog

from workers.durable import commit_file, file_sha256, write_atomic
from workers.latent_segments import LATENT_FILE_RE, SIDECAR_DIR, LatentSegmentWriter
from workers.types import Chunk
from workers.video import Mp4Writer

log = structlog.get_logger(__name__)

SUFFIXES = {"mp4": ".mp4", "latents": ".safetensors"}  # output kind -> segment file suffix
KIND_OF_SUFFIX = {v: k for k, v in SUFFIXES.items()}
SEGMENT_RE = re.compile(r"^(\d{8})-(\d{8})(\.mp4|\.safetensors)$")
MANIFEST = "manifest.json"


class Segment(NamedTuple):
    first: int
    last: int
    kind: str  # "mp4" | "latents"

    @property
    def name(self) -> str:
        return segment_name(self.first, self.last, self.kind)


def segment_name(first: int, last: int, kind: str = "mp4") -> str:
    return f"{first:08d}-{last:08d}{SUFFIXES[kind]}"


def sidecar_name(first: int, last: int) -> str:
    """File name (in ``latents/``) of the latent sidecar of the mp4 segment of chunks first..last."""
    return f"{first:08d}-{last:08d}.safetensors"


def sidecar_files(lat_dir: Path) -> list[tuple[int, int]]:
    """(first, last) chunk ranges of the committed latent sidecars in ``lat_dir``, ascending."""
    if not lat_dir.is_dir():
        return []
    return sorted((int(m[1]), int(m[2])) for p in lat_dir.iterdir() if (m := LATENT_FILE_RE.match(p.name)))


def chunk_kind(chunk: Chunk) -> str:
    """ "latents" when the chunk has no decoded frames, else "mp4"."""
    return "latents" if chunk.frames.numel() == 0 else "mp4"


def write_json_atomic(path: Path, obj: dict, *, durable: bool = True) -> None:
    """Commit a JSON file (manifest, run.json) atomically and durably; ``durable=False`` is for the bench only."""
    write_atomic(path, json.dumps(obj, indent=1).encode(), durable=durable)


def read_manifest(stream_dir: Path) -> dict | None:
    try:
        return json.loads((stream_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def segment_files(seg_dir: Path) -> list[Segment]:
    """The committed segment files (mp4 and latent), ascending by chunk range."""
    if not seg_dir.is_dir():
        return []
    out = []
    for p in seg_dir.iterdir():
        m = SEGMENT_RE.match(p.name)
        if m:
            out.append(Segment(int(m.group(1)), int(m.group(2)), KIND_OF_SUFFIX[m.group(3)]))
    return sorted(out)


def list_segments(seg_dir: Path) -> list[tuple[int, int]]:
    """(first, last) chunk ranges of the committed segment files (either kind), ascending."""
    return [(s.first, s.last) for s in segment_files(seg_dir)]


class StreamOutput:
    """Segments + manifest of one stream, owned by the worker that currently holds the stream."""

    def __init__(
        self,
        stream_dir: str | os.PathLike,
        stream_id: str,
        fps: int,
        segment_chunks: int,
        target_chunks: int | None,
        keep_segments: int | None = None,
        upscale: int = 4,
        crf: int = 0,
        *,
        keep_latents: bool = False,
        lossless: bool = False,
    ):
        self.dir = Path(stream_dir)
        self.seg_dir = self.dir / "segments"
        self.lat_dir = self.dir / SIDECAR_DIR
        self.stream_id, self.fps, self.segment_chunks = stream_id, fps, segment_chunks
        self.target_chunks, self.keep_segments = target_chunks, keep_segments
        self.upscale, self.crf, self.keep_latents, self.lossless = upscale, crf, keep_latents, lossless
        self._writer: Mp4Writer | LatentSegmentWriter | None = None
        self._sidecar: LatentSegmentWriter | None = None  # the open mp4 segment's latents (keep_latents)
        self._open_first: int | None = None
        self._open_last: int | None = None
        self.kind: str | None = None  # "mp4" | "latents", decided by the first chunk written
        self.frames_per_chunk = 0
        self.segments: list[Segment] = []
        self.checksums: dict[str, tuple[str, int]] = {}  # segment file name -> (sha256 hex, bytes)
        self.sidecars: set[str] = set()  # names of the committed sidecars of self.segments
        self.latent_checksums: dict[str, tuple[str, int]] = {}  # sidecar file name -> (sha256 hex, bytes)
        self.dropped_segments = 0
        self.chunks_done = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start_at(self, chunk: int) -> None:
        """Prepare to write chunk ``chunk`` next: drop partial files and every segment (and sidecar) at or past it."""
        self.seg_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.seg_dir, self.lat_dir):
            for p in d.iterdir() if d.is_dir() else ():
                if p.name.startswith("."):  # an open segment of a worker that died
                    p.unlink(missing_ok=True)
        for s in segment_files(self.seg_dir):
            if s.last >= chunk:
                if s.first < chunk:  # cannot happen when checkpoints sit on segment boundaries
                    raise RuntimeError(f"{self.stream_id}: segment {s.name} straddles checkpoint {chunk}")
                (self.seg_dir / s.name).unlink(missing_ok=True)
                log.info("segment.discarded", stream_id=self.stream_id, chunk_index=s.first, last=s.last)
        self.segments = segment_files(self.seg_dir)
        mp4_ranges = {(s.first, s.last) for s in self.segments if s.kind == "mp4"}
        for first, last in sidecar_files(self.lat_dir):
            if last >= chunk and first < chunk:
                raise RuntimeError(
                    f"{self.stream_id}: sidecar {sidecar_name(first, last)} straddles checkpoint {chunk}"
                )
            if last >= chunk or (first, last) not in mp4_ranges:  # past the restart, or its mp4 never committed
                (self.lat_dir / sidecar_name(first, last)).unlink(missing_ok=True)
                log.info("sidecar.discarded", stream_id=self.stream_id, chunk_index=first, last=last)
        self.sidecars = {sidecar_name(f, la) for f, la in sidecar_files(self.lat_dir)}
        prev = read_manifest(self.dir) or {}
        self.checksums = _known_checksums(prev, {s.name for s in self.segments})
        self.latent_checksums = _known_checksums(prev, self.sidecars, "latents")
        self.dropped_segments = int(prev.get("dropped_segments", 0))
        self.frames_per_chunk = int(prev.get("frames_per_chunk", 0))
        self.kind = self.segments[-1].kind if self.segments else prev.get("output")
        self.chunks_done = chunk

    def write(self, chunk: Chunk) -> bool:
        """Append a chunk; returns True if it closed a segment."""
        kind = chunk_kind(chunk)
        if self._writer is None:
            other = [s for s in self.segments if s.kind != kind]
            if other:  # one stream, one kind: a join of mixed segments would be meaningless
                o = other[0]
                raise RuntimeError(f"{self.stream_id}: chunk {chunk.chunk_index} is {kind}, {o.name} is {o.kind}")
            self.kind, self._open_first = kind, chunk.chunk_index
            path = self._open_path()
            if kind == "mp4":
                self._writer = Mp4Writer(path, self.fps, self.upscale, self.crf, lossless=self.lossless)
                if self.keep_latents:
                    side = self.lat_dir / f".open-{chunk.chunk_index:08d}.safetensors"  # never written: in memory
                    self._sidecar = LatentSegmentWriter(side, chunk.chunk_index)
            else:  # latents are held in memory until the segment closes (at most segment_chunks chunks)
                self._writer = LatentSegmentWriter(path, chunk.chunk_index)
        elif chunk.chunk_index != self._open_last + 1:
            raise RuntimeError(f"{self.stream_id}: chunk {chunk.chunk_index} after {self._open_last}")
        elif kind != self.kind:
            raise RuntimeError(f"{self.stream_id}: chunk {chunk.chunk_index} is {kind} in a {self.kind} segment")
        if self._sidecar is not None:  # checks the latents' shape before any frame is encoded
            self._sidecar.write(chunk.latents)
        self._writer.write(chunk.frames if kind == "mp4" else chunk.latents)
        self._open_last = chunk.chunk_index
        self.frames_per_chunk = chunk.num_frames
        if self.closes_at(chunk.chunk_index):
            self.close_segment()
            return True
        return False

    def closes_at(self, chunk_index: int) -> bool:
        """Whether writing chunk ``chunk_index`` closes its segment (a multiple of segment_chunks, or the end)."""
        end = chunk_index + 1
        return end % self.segment_chunks == 0 or end == self.target_chunks

    def _open_path(self) -> Path:
        return self.seg_dir / f".open-{self._open_first:08d}{SUFFIXES[self.kind]}"

    def close_segment(self) -> None:
        """Commit the open segment (if any) durably under its chunk-range name, recording its checksum.

        A sidecar is committed first, then its mp4; if either commit fails neither stays committed.
        """
        if self._writer is None:
            return
        seg = Segment(self._open_first, self._open_last, self.kind)
        side = sidecar_name(seg.first, seg.last) if self._sidecar is not None else None
        if side is not None:
            self.lat_dir.mkdir(exist_ok=True)
            try:
                self.latent_checksums[side] = _commit_segment(self._sidecar, self.lat_dir / side)
            except BaseException:
                self._writer.abort()  # removes the mp4's temp file
                raise
        try:
            self.checksums[seg.name] = _commit_segment(self._writer, self.seg_dir / seg.name)
        except BaseException:
            if side is not None:
                self._drop_sidecar(seg)
            raise
        if side is not None:
            self.sidecars.add(side)
        self._writer, self._sidecar, self._open_first, self._open_last = None, None, None, None
        for old in self.segments:
            if old.first == seg.first and old.name != seg.name:  # replaced by a segment of another range
                (self.seg_dir / old.name).unlink(missing_ok=True)
                self.checksums.pop(old.name, None)
                if old.last != seg.last:
                    self._drop_sidecar(old)
        self.segments = sorted([s for s in self.segments if s.first != seg.first] + [seg])
        self.chunks_done = seg.last + 1
        if self.keep_segments is not None:
            while len(self.segments) > self.keep_segments:
                old = self.segments.pop(0)
                (self.seg_dir / old.name).unlink(missing_ok=True)
                self.checksums.pop(old.name, None)
                self._drop_sidecar(old)
                self.dropped_segments += 1

    def _drop_sidecar(self, s: Segment) -> None:
        name = sidecar_name(s.first, s.last)
        (self.lat_dir / name).unlink(missing_ok=True)
        self.sidecars.discard(name)
        self.latent_checksums.pop(name, None)

    def abort(self) -> None:
        if self._sidecar is not None:
            self._sidecar.abort()
            self._sidecar = None
        if self._writer is not None:
            self._writer.abort()
            with contextlib.suppress(FileNotFoundError):
                self._open_path().unlink()
            self._writer = None

    @property
    def at_boundary(self) -> bool:
        return self._writer is None

    # ---- manifest ----------------------------------------------------------------------------
    def write_manifest(self, state: str, last_checkpoint: int | None, extra: dict | None = None) -> dict:
        m = {
            "stream_id": self.stream_id,
            "state": state,
            "chunks_done": self.chunks_done,
            "frames_done": self.chunks_done * self.frames_per_chunk,
            "frames_per_chunk": self.frames_per_chunk,
            "fps": self.fps,
            "target_chunks": self.target_chunks,
            "last_checkpoint": last_checkpoint,
            "output": self.kind,
            "segments": [self._entry(s) for s in sorted(self.segments)],
            "dropped_segments": self.dropped_segments,
            "updated_at": time.time(),
            **(extra or {}),
        }
        write_json_atomic(self.dir / MANIFEST, m)
        return m

    def _entry(self, s: Segment) -> dict:
        e = {"first": s.first, "last": s.last, "file": f"segments/{s.name}"}
        if s.name in self.checksums:  # absent for a segment committed before checksums (unverified)
            e["sha256"], e["bytes"] = self.checksums[s.name]
        side = sidecar_name(s.first, s.last)
        if s.kind == "mp4" and side in self.sidecars:
            e["latents"] = f"{SIDECAR_DIR}/{side}"
            if side in self.latent_checksums:
                e["latents_sha256"], e["latents_bytes"] = self.latent_checksums[side]
        return e


def _commit_segment(writer: Mp4Writer | LatentSegmentWriter, target: Path) -> tuple[str, int]:
    """Commit a writer's finished segment at ``target``; returns (sha256 hex, bytes) of what was committed.

    Latent bytes are built in memory, hashed and written in one durable write. An mp4 is finished
    into the writer's temp file, hashed there (a segment is small) and then committed by rename, so
    the checksum is of exactly the bytes that appear under ``target``.
    """
    if isinstance(writer, LatentSegmentWriter):
        data = writer.to_bytes()
        write_atomic(target, data)
        return hashlib.sha256(data).hexdigest(), len(data)
    try:
        digest = file_sha256(writer.finish())
    except BaseException:
        writer.abort()  # removes the temp file
        raise
    commit_file(writer.tmp, target)  # removes the temp file itself if the commit fails
    return digest


def _known_checksums(manifest: dict, names: set[str], key: str = "file") -> dict[str, tuple[str, int]]:
    """Checksums the previous manifest recorded for files still present (matched by file name).

    A resumed stream rebuilds its segment list from the directory; without this its next manifest
    would drop the checksums of every segment written before the restart. ``key`` "file" reads the
    segments' ``sha256`` / ``bytes``, "latents" the sidecars' ``latents_sha256`` / ``latents_bytes``.
    """
    sha, size = ("sha256", "bytes") if key == "file" else (f"{key}_sha256", f"{key}_bytes")
    out = {}
    for e in manifest.get("segments") or []:
        name = Path(str(e.get(key, ""))).name
        if name and name in names and isinstance(e.get(sha), str) and isinstance(e.get(size), int):
            out[name] = (e[sha], e[size])
    return out
