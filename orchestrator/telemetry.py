"""Rolling per-stream figures the dashboard shows: frames/s, latencies, sizes, previews, a log tail.

Fed by the Orchestrator from each step's :class:`StreamProgress`; bounded in size whatever the run's
length (a day-long stream keeps the same few hundred samples).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from workers.messages import StreamProgress

HISTORY = 300  # samples kept per stream for the plots
FPS_WINDOW_S = 5.0  # frames/s is measured over this much recent time
PREVIEWS = 8  # newest preview PNGs kept per stream, by chunk index
LOG_LINES = 200  # newest log lines kept per stream


@dataclass(frozen=True)
class Sample:
    time: float  # time.time() when the orchestrator received the step
    chunk: int  # the stream's next chunk after the step
    frames: int  # frames the step produced for the stream
    step_ms: float  # wall time of the worker's batched step
    retrieval_ms: float | None


@dataclass
class StreamTelemetry:
    samples: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    previews: OrderedDict = field(default_factory=OrderedDict)  # chunk index -> PNG bytes
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    cache_bytes: int = 0
    frames_per_chunk: int | None = None  # video frames per chunk, once a step reported one
    memory_rows: int | None = None
    checkpoint: int | None = None
    checkpoint_at: float | None = None  # time.time() the orchestrator first saw ``checkpoint``

    def on_progress(self, p: StreamProgress, step_seconds: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.samples.append(Sample(now, p.next_chunk, p.frames, step_seconds * 1e3, p.retrieval_ms))
        self.cache_bytes = p.cache_bytes or self.cache_bytes
        self.frames_per_chunk = p.frames or self.frames_per_chunk
        self.memory_rows = p.memory_rows if p.memory_rows is not None else self.memory_rows
        if p.preview is not None:
            self.previews[p.next_chunk - 1] = p.preview
            while len(self.previews) > PREVIEWS:
                self.previews.popitem(last=False)
        if p.last_checkpoint is not None and p.last_checkpoint != self.checkpoint:
            self.add_log("checkpoint.saved", {"chunk_index": p.last_checkpoint}, now)
        self.saw_checkpoint(p.last_checkpoint, now)

    def saw_checkpoint(self, chunk: int | None, now: float | None = None) -> None:
        if chunk is not None and chunk != self.checkpoint:
            self.checkpoint, self.checkpoint_at = chunk, time.time() if now is None else now

    def fps(self, now: float | None = None) -> float:
        """Frames per second over the last FPS_WINDOW_S (0 when the stream has not produced lately)."""
        now = time.time() if now is None else now
        newest = first = None
        frames = 0
        for s in reversed(self.samples):  # newest first; stop at the window's edge
            if now - s.time > FPS_WINDOW_S:
                break
            newest = newest or s
            first = s
            frames += s.frames
        if first is None or first is newest:
            return 0.0
        return (frames - first.frames) / (newest.time - first.time) if newest.time > first.time else 0.0

    def latest_preview(self) -> int | None:
        return next(reversed(self.previews)) if self.previews else None

    def add_log(self, event: str, fields: dict, now: float | None = None) -> None:
        self.log.append({"time": time.time() if now is None else now, "event": event, **fields})
