"""Per-stream output: mp4 segments named by chunk range, and ``manifest.json``.

``DIR/streams/<id>/segments/<first:08d>-<last:08d>.mp4`` holds chunks first..last. A segment is
encoded into a hidden file and renamed into place when it closes, so readers only ever see whole
segments, and a segment regenerated after a recovery replaces its earlier copy under the same name.
Segments close every ``segment_chunks`` chunks (aligned to multiples of it), at the stream's end and
when the stream is stopped or moved; checkpoints are only taken at those boundaries, so a stream
restarted from checkpoint ``c`` starts a fresh segment at ``c`` after deleting any segment at or past
``c`` (the lost tail, regenerated identically).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import structlog

from workers.types import Chunk
from workers.video import Mp4Writer

log = structlog.get_logger(__name__)

SEGMENT_RE = re.compile(r"^(\d{8})-(\d{8})\.mp4$")
MANIFEST = "manifest.json"


def segment_name(first: int, last: int) -> str:
    return f"{first:08d}-{last:08d}.mp4"


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_manifest(stream_dir: Path) -> dict | None:
    try:
        return json.loads((stream_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def list_segments(seg_dir: Path) -> list[tuple[int, int]]:
    """(first, last) chunk ranges of the committed segment files, ascending."""
    if not seg_dir.is_dir():
        return []
    out = []
    for p in seg_dir.iterdir():
        m = SEGMENT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return sorted(out)


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
    ):
        self.dir = Path(stream_dir)
        self.seg_dir = self.dir / "segments"
        self.stream_id, self.fps, self.segment_chunks = stream_id, fps, segment_chunks
        self.target_chunks, self.keep_segments = target_chunks, keep_segments
        self.upscale, self.crf = upscale, crf
        self._writer: Mp4Writer | None = None
        self._open_first: int | None = None
        self._open_last: int | None = None
        self.frames_per_chunk = 0
        self.segments: list[tuple[int, int]] = []
        self.dropped_segments = 0
        self.chunks_done = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start_at(self, chunk: int) -> None:
        """Prepare to write chunk ``chunk`` next: drop partial files and every segment at or past it."""
        self.seg_dir.mkdir(parents=True, exist_ok=True)
        for p in self.seg_dir.iterdir():
            if p.name.startswith("."):  # an open segment of a worker that died
                p.unlink(missing_ok=True)
        for first, last in list_segments(self.seg_dir):
            if last >= chunk:
                if first < chunk:  # cannot happen when checkpoints sit on segment boundaries
                    raise RuntimeError(f"{self.stream_id}: segment {first}-{last} straddles checkpoint {chunk}")
                (self.seg_dir / segment_name(first, last)).unlink(missing_ok=True)
                log.info("segment.discarded", stream_id=self.stream_id, chunk_index=first, last=last)
        self.segments = list_segments(self.seg_dir)
        prev = read_manifest(self.dir) or {}
        self.dropped_segments = int(prev.get("dropped_segments", 0))
        self.frames_per_chunk = int(prev.get("frames_per_chunk", 0))
        self.chunks_done = chunk

    def write(self, chunk: Chunk) -> bool:
        """Append a chunk; returns True if it closed a segment."""
        if self._writer is None:
            self._open_first = chunk.chunk_index
            self._writer = Mp4Writer(
                self.seg_dir / f".open-{chunk.chunk_index:08d}.mp4", self.fps, self.upscale, self.crf
            )
        elif chunk.chunk_index != self._open_last + 1:
            raise RuntimeError(f"{self.stream_id}: chunk {chunk.chunk_index} after {self._open_last}")
        self._writer.write(chunk.frames)
        self._open_last = chunk.chunk_index
        self.frames_per_chunk = chunk.num_frames
        end = chunk.chunk_index + 1
        if end % self.segment_chunks == 0 or end == self.target_chunks:
            self.close_segment()
            return True
        return False

    def close_segment(self) -> None:
        """Commit the open segment (if any) under its chunk-range name."""
        if self._writer is None:
            return
        tmp = self._writer.close()
        first, last = self._open_first, self._open_last
        os.replace(tmp, self.seg_dir / segment_name(first, last))
        self._writer, self._open_first, self._open_last = None, None, None
        self.segments = [s for s in self.segments if s[0] != first] + [(first, last)]
        self.chunks_done = last + 1
        if self.keep_segments is not None:
            while len(self.segments) > self.keep_segments:
                f0, l0 = self.segments.pop(0)
                (self.seg_dir / segment_name(f0, l0)).unlink(missing_ok=True)
                self.dropped_segments += 1

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            with contextlib.suppress(FileNotFoundError):
                (self.seg_dir / f".open-{self._open_first:08d}.mp4").unlink()
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
            "segments": [
                {"first": f, "last": l, "file": f"segments/{segment_name(f, l)}"} for f, l in sorted(self.segments)
            ],
            "dropped_segments": self.dropped_segments,
            "updated_at": time.time(),
            **(extra or {}),
        }
        write_json_atomic(self.dir / MANIFEST, m)
        return m
