"""Which history chunks may be retrieved for the next chunk.

Both policies work in chunk units (the store keeps one row per chunk): ``next_chunk`` is the index of
the chunk about to be generated; the local window holds chunks ``next_chunk - window_chunks ..
next_chunk - 1``; the sink holds chunks ``0 .. sink_chunks - 1`` and is always attended to, so it is
never worth retrieving.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class CandidateRange:
    """Chunks ``start <= chunk_index < stop`` (empty when stop <= start)."""

    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __contains__(self, chunk_index: int) -> bool:
        return self.start <= chunk_index < self.stop


def _check_non_negative(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name}={v!r} must be an int >= 0")


def longlive_rag_candidates(
    next_chunk: int, window_chunks: int, recent_exclude: int, sink_chunks: int = 0
) -> CandidateRange:
    """LongLive-RAG's pool: chunks already evicted from the local window, minus the ``recent_exclude``
    (R) most recently evicted ones, which sit right next to the window and would mostly repeat it.

    Empty while the history is not longer than sink + window + R.
    """
    _check_non_negative(
        next_chunk=next_chunk, window_chunks=window_chunks, recent_exclude=recent_exclude, sink_chunks=sink_chunks
    )
    evicted_stop = next_chunk - window_chunks  # chunks below this have left the window
    return CandidateRange(sink_chunks, max(sink_chunks, evicted_stop - recent_exclude))


def adaptive_window_exclusion(
    next_chunk: int, window_chunks: int, sink_chunks: int = 0, min_long_range: int = 1
) -> CandidateRange:
    """OmniMem's adaptive window exclusion: leave the local window (and sink) out of the candidates only
    once at least ``min_long_range`` long-range chunks exist, so a sparse budget is spent on history the
    window does not already show; before that, every generated chunk is a candidate.
    """
    _check_non_negative(next_chunk=next_chunk, window_chunks=window_chunks, sink_chunks=sink_chunks)
    if min_long_range < 1:
        raise ValueError(f"{min_long_range=} must be >= 1")
    long_range = CandidateRange(sink_chunks, max(sink_chunks, next_chunk - window_chunks))
    if len(long_range) >= min_long_range:
        return long_range
    return CandidateRange(0, next_chunk)
