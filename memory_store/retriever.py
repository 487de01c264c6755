"""Retrieval of a stream's most relevant non-local history for its next chunk.

Two tiers (default): the stream's newest ``config.hot_tier_rows`` embeddings sit in a
:class:`~memory_store.hot_tier.HotTier` in this process and are searched exactly; the history below the
tier's floor is searched through LanceDB (flat and exact below ``index_threshold_rows`` rows, through
the vector index above, refined by ``refine_factor``). The two top-k lists merge by score. Payloads come
from the tier's byte-bounded LRU (float16, as stored) or, on a miss, from LanceDB by chunk index. With
``config.hot_tier = False`` every search is one LanceDB vector search that also returns the payloads.
RAM per stream is bounded whatever the history's length: ``hot_tier_rows`` rows plus the LRU budget.

Version pinning: ``search(..., version=v)`` and ``open_stream(..., version=v)`` read the table as of
version ``v``, so a stream resumed from a checkpoint that recorded ``v`` retrieves exactly what the
original run would have. Chunks passed to :meth:`Retriever.observe` (the ones this process generated)
are searchable at once, whatever the version; with a writer attached (:meth:`Retriever.attach_writer`)
their embeddings and payloads are held until the writer reports them durable, so neither a small LRU
nor the hot tier's eviction loses a chunk that the store does not have yet: the cold search scores the
held ones below the tier's floor exactly and merges them with LanceDB's hits.

A stream resumed from a checkpoint reads as of the checkpoint's version until the stream's next
checkpoint (:meth:`Retriever.follow_latest`): the old version's tag is released after that, and cleanup
may delete the files it references.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from memory_store.config import MemoryStoreConfig
from memory_store.db import (
    PAYLOAD_COLUMNS,
    StoredChunk,
    connect,
    fetch_chunks,
    open_chunk_table,
    read_embeddings,
    rows_to_chunks,
)
from memory_store.hot_tier import HotTier, payload_nbytes
from memory_store.policies import CandidateRange, adaptive_window_exclusion, longlive_rag_candidates
from memory_store.schema import ChunkRecord, MemoryStoreError, UnknownStreamError, validate_stream_id

__all__ = [
    "CandidateRange",
    "RetrievedChunk",
    "Retriever",
    "adaptive_window_exclusion",
    "longlive_rag_candidates",
]

log = structlog.get_logger(__name__)

_MAX_PINNED = 2  # read-only tiers of other versions kept per retriever (a resumed stream needs one)
_MAX_TABLES = 16  # open LanceDB table handles kept per retriever (each holds version metadata)


@dataclass(frozen=True)
class RetrievedChunk:
    chunk_index: int
    first_frame: int
    num_frames: int
    score: float  # cosine similarity to the query
    latents: torch.Tensor  # float16 [F, C, H, W], as stored (callers cast to their compute dtype)


def _merge(stored: list[tuple[int, float]], held: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Two hit lists as one, best first (ties: lower chunk first); a chunk in both (made durable while
    searched) keeps its held, exact score."""
    seen = {c for c, _ in held}
    return sorted(held + [h for h in stored if h[0] not in seen], key=lambda h: (-h[1], h[0]))


class Retriever:
    """Searches the history of any number of streams; one per generator process.

    Args:
        config: the store's config (uri, embedding_dim, hot tier and payload cache settings).
        quantize_min_rows: passed to each :class:`HotTier`.
    """

    def __init__(self, config: MemoryStoreConfig, *, quantize_min_rows: int = 32768) -> None:
        self.config = config
        self.quantize_min_rows = quantize_min_rows
        self._db = connect(config)
        self._lock = threading.RLock()
        self._tiers: dict[str, HotTier] = {}  # the tier a generator appends to, per stream
        self._pinned: dict[tuple[str, int], HotTier] = {}  # read-only tiers of other versions (_MAX_PINNED)
        self._tables: OrderedDict[tuple[str, int | None], object] = OrderedDict()  # LRU, _MAX_TABLES
        self._cold_floor: dict[tuple[str, int | None], int] = {}  # tier floor when the table was refreshed
        self.cold_searches = 0
        self._executor: ThreadPoolExecutor | None = None
        # observed chunks not yet durable, per stream: (payload, unit embedding) (only with a writer attached,
        # which bounds them by its queue and reports each commit through mark_durable)
        self._pending: dict[str, dict[int, tuple[StoredChunk, np.ndarray]]] | None = None
        self._durable_since: dict[str, int] = {}  # lowest chunk made durable since the cold handle's refresh

    def attach_writer(self, writer) -> None:
        """Hold every observed payload until ``writer`` (a :class:`~memory_store.writer.MemoryWriter` in
        this process, which the observed chunks are put to) has committed it."""
        with self._lock:
            if self._pending is None:
                self._pending = {}
        writer.add_commit_listener(self.mark_durable)

    def mark_durable(self, stream_id: str, chunk_indices: list[int]) -> None:
        """The writer committed these chunks: their payloads may now leave memory with the LRU."""
        with self._lock:
            pending = None if self._pending is None else self._pending.get(stream_id)
            if pending:
                for c in chunk_indices:
                    pending.pop(int(c), None)
            if chunk_indices:
                low = min(int(c) for c in chunk_indices)
                self._durable_since[stream_id] = min(low, self._durable_since.get(stream_id, low))

    def follow_latest(self, stream_id: str) -> None:
        """Stop reading ``stream_id`` as of the version its tier was pinned to (a resumed stream, once it
        has a checkpoint of its own): from now on its cold searches and payload reads see the latest
        version, which holds the same chunks, and the pinned version may be cleaned up."""
        with self._lock:
            tier = self._tiers.get(stream_id)
            if tier is None or tier.pinned is None:
                return
            old, tier.pinned = tier.pinned, None
            self._tables.pop((stream_id, old), None)
            self._cold_floor.pop((stream_id, old), None)
        log.info("retriever_follows_latest", stream_id=stream_id, unpinned_version=old)

    # ------------------------------------------------------------------ hot tier management

    def open_stream(self, stream_id: str, *, version: int | None = None, create: bool = False) -> HotTier:
        """Load (warm start) the stream's hot tier from the store, as of ``version`` if given.

        Raises:
            UnknownStreamError: no table for the stream and ``create`` is False.
        """
        validate_stream_id(stream_id)
        try:
            tier = HotTier.from_lancedb(
                self.config, stream_id, version=version, quantize_min_rows=self.quantize_min_rows
            )
        except UnknownStreamError:
            if not create or version is not None:
                raise
            tier = self._new_tier()
        tier.pinned = version
        with self._lock:
            old = self._tiers.get(stream_id)
            self._tiers[stream_id] = tier
        if old is not None:
            old.close()
        return tier

    def observe(self, record: ChunkRecord) -> None:
        """Make a chunk this process just generated searchable now (before its commit is durable).

        The payload is cached as float16, exactly as it would be read back from the store.
        """
        sid = validate_stream_id(record.stream_id)
        emb = np.asarray(record.embedding, dtype=np.float32)
        if emb.shape != (self.config.embedding_dim,):
            raise ValueError(f"{sid}[{record.chunk_index}]: embedding.shape={emb.shape}")
        with self._lock:
            tier = self._tiers.get(sid)
        if tier is None:
            tier = self.open_stream(sid, create=True)
        latents = record.latents.detach().to("cpu", torch.float16).contiguous()
        payload = StoredChunk(int(record.chunk_index), int(record.first_frame), int(record.num_frames), latents)
        with self._lock:  # held before the tier may evict it
            if self._pending is not None:
                unit = emb / max(float(np.linalg.norm(emb)), 1e-30)
                self._pending.setdefault(sid, {})[payload.chunk_index] = (payload, unit)
        tier.append(int(record.chunk_index), emb)
        tier.payloads.put(payload.chunk_index, payload)

    def stream_rows(self, stream_id: str) -> int:
        """Chunks of the stream searchable in this process's hot tier (0 if it was never opened)."""
        with self._lock:
            tier = self._tiers.get(stream_id)
        return len(tier) if tier is not None else 0

    def _new_tier(self) -> HotTier:
        return HotTier(
            self.config.embedding_dim,
            self.config.hot_tier_device,
            max_rows=self.config.hot_tier_rows,
            payload_cache_bytes=self.config.payload_cache_bytes,
            quantize_min_rows=self.quantize_min_rows,
        )

    def _tier_for(self, stream_id: str, version: int | None) -> HotTier:
        with self._lock:
            tier = self._tiers.get(stream_id)
            if tier is not None and (version is None or tier.pinned == version):
                return tier
            pinned = self._pinned.get((stream_id, version)) if version is not None else None
        if pinned is not None:
            return pinned
        if version is None or tier is None:
            return self.open_stream(stream_id, version=version)
        pinned = HotTier.from_lancedb(self.config, stream_id, version=version, quantize_min_rows=self.quantize_min_rows)
        pinned.pinned = version
        with self._lock:
            tier = self._pinned.setdefault((stream_id, version), pinned)
            while len(self._pinned) > _MAX_PINNED:
                self._pinned.pop(next(iter(self._pinned))).close()
            return tier

    def _catch_up(self, stream_id: str, tier: HotTier, stop: int) -> None:
        """Pull durable rows a latest-version tier has not seen (written by another process)."""
        if tier.pinned is not None or tier.max_chunk_index >= stop - 1:
            return
        try:
            table = self._table(stream_id, None, refresh=True)
        except UnknownStreamError:
            return
        ci, emb = read_embeddings(table, after_chunk=tier.max_chunk_index)
        if len(ci):
            tier.extend(ci, emb)
            log.debug("hot_tier_caught_up", stream_id=stream_id, rows=len(ci))

    def _table(self, stream_id: str, version: int | None, *, refresh: bool = False):
        key = (stream_id, version)
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
        if table is None:
            table = open_chunk_table(self._db, stream_id, self.config.embedding_dim, version=version)
            with self._lock:
                self._tables[key] = table
                while len(self._tables) > _MAX_TABLES:
                    self._tables.popitem(last=False)
        elif refresh and version is None:
            table.checkout_latest()
        return table

    # ------------------------------------------------------------------ search

    def search(
        self,
        stream_id: str,
        query: np.ndarray,
        k: int,
        *,
        before_chunk: int,
        exclude_recent: int = 0,
        version: int | None = None,
        start_chunk: int = 0,
    ) -> list[RetrievedChunk]:
        """Top-k chunks by cosine similarity with ``start_chunk <= chunk_index < before_chunk - exclude_recent``.

        ``before_chunk`` is the first chunk of the local window; ``exclude_recent`` is LongLive-RAG's R.
        Returns best first (ties: lower chunk index first).

        Raises:
            ValueError: bad stream id, query not float [E] and finite, negative k / exclude_recent.
            UnknownStreamError: the stream has no table and nothing was observed for it.
            ChecksumError: a retrieved payload fails its checksum.
            MemoryStoreError: ``version`` does not exist.
        """
        if exclude_recent < 0:
            raise ValueError(f"{exclude_recent=} must be >= 0")
        rng = CandidateRange(start_chunk, before_chunk - exclude_recent)
        return self.search_range(stream_id, query, k, rng, version=version)

    def search_range(
        self, stream_id: str, query: np.ndarray, k: int, candidates: CandidateRange, *, version: int | None = None
    ) -> list[RetrievedChunk]:
        """Like :meth:`search` over an explicit candidate range (e.g. from one of the policies)."""
        sid = validate_stream_id(stream_id)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape != (self.config.embedding_dim,) or not np.isfinite(q).all():
            raise ValueError(f"query.shape={q.shape} must be ({self.config.embedding_dim},) and finite")
        if k < 0:
            raise ValueError(f"{k=} must be >= 0")
        if k == 0 or len(candidates) == 0:  # e.g. the first chunks of a stream: nothing to retrieve yet
            return []
        if not self.config.hot_tier:
            return self._search_cold(sid, q, k, candidates, version)
        tier = self._tier_for(sid, version)
        self._catch_up(sid, tier, candidates.stop)
        extra = self.config.payload_readahead
        hits = tier.topk(q, k + extra, candidates.stop, min_chunk_index=max(candidates.start, tier.floor))
        ranked = list(zip(hits.chunk_indices.tolist(), hits.scores.tolist()))
        if candidates.start < tier.floor:  # history older than the hot tier: LanceDB's own search
            cold = self._search_cold_ids(
                sid, tier, q, k + extra, CandidateRange(candidates.start, min(candidates.stop, tier.floor))
            )
            ranked = sorted(ranked + cold, key=lambda h: (-h[1], h[0]))  # best first; ties: lower chunk
        top = [c for c, _ in ranked[:k]]
        payloads = self._payloads(sid, tier, top, readahead=[c for c, _ in ranked[k : k + extra]])
        return [
            RetrievedChunk(c, payloads[c].first_frame, payloads[c].num_frames, float(s), payloads[c].latents)
            for c, s in ranked[:k]
        ]

    def _search_cold_ids(
        self, sid: str, tier: HotTier, q: np.ndarray, k: int, rng: CandidateRange
    ) -> list[tuple[int, float]]:
        """(chunk index, cosine score) of the top-k chunks in ``rng`` (all below the tier's floor), from
        LanceDB at the tier's version: an exact flat scan below ``index_threshold_rows``, the vector
        index (``nprobes``, ``refine_factor``) above it."""
        key = (sid, tier.pinned)
        with self._lock:  # the held chunks first: one made durable after this is in the refreshed handle
            held = self._held_hits(sid, q, k, rng)
            stale = self._cold_floor.get(key, -1) < tier.floor or self._durable_since.get(sid, tier.floor) < tier.floor
            refresh = tier.pinned is None and stale  # rows it must see
            if refresh:
                self._durable_since.pop(sid, None)
        self.cold_searches += 1
        try:
            table = self._table(sid, tier.pinned, refresh=refresh)
        except UnknownStreamError:  # nothing committed yet: every cold chunk is still held
            return held
        self._cold_floor[key] = tier.floor
        t = self._vector_search(table, q, k, rng, ["chunk_index"])
        ci = t.column("chunk_index").to_numpy()
        scores = 1.0 - t.column("_distance").to_numpy().astype(np.float64)
        return _merge([(int(c), float(s)) for c, s in zip(ci, scores)], held)

    def _held_hits(self, sid: str, q: np.ndarray, k: int, rng: CandidateRange) -> list[tuple[int, float]]:
        """Exact (chunk index, cosine score) top-k over the chunks in ``rng`` held until durable. Lock held."""
        held = [(c, e) for c, (_, e) in ((self._pending or {}).get(sid) or {}).items() if rng.start <= c < rng.stop]
        if not held:
            return []
        qn = q / max(float(np.linalg.norm(q)), 1e-30)
        scored = [(c, float(np.dot(e, qn))) for c, e in held]
        return sorted(scored, key=lambda h: (-h[1], h[0]))[:k]

    def _vector_search(self, table, q: np.ndarray, k: int, rng: CandidateRange, columns: list[str]):
        """LanceDB's cosine top-k over chunks in ``rng`` (prefiltered), with ``columns`` and ``_distance``."""
        qn = q / max(float(np.linalg.norm(q)), 1e-30)
        return (
            table.search(qn, vector_column_name="embedding")
            .distance_type("cosine")
            .where(f"chunk_index >= {int(rng.start)} AND chunk_index < {int(rng.stop)}", prefilter=True)
            .nprobes(self.config.nprobes)
            .refine_factor(self.config.refine_factor)
            .limit(k)
            .select([*columns, "_distance"])
            .to_arrow()
        )

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this retriever holds, by structure (hot tiers' arrays, payload LRUs), over all streams."""
        with self._lock:
            tiers = list(self._tiers.values()) + list(self._pinned.values())
            pending = [p for d in (self._pending or {}).values() for p in d.values()]
        return {
            "hot_tier": sum(t.nbytes for t in tiers),
            "payload_cache": sum(t.payloads.nbytes for t in tiers),
            # the LRU may hold the payloads too; the embedding is float32
            "pending_payloads": sum(payload_nbytes(p) + e.nbytes for p, e in pending),
        }

    def _payloads(
        self, stream_id: str, tier: HotTier, chunk_indices: list[int], readahead: list[int] = ()
    ) -> dict[int, StoredChunk]:
        """Payloads of ``chunk_indices`` from the LRU or, for the missing ones, one LanceDB read that also
        brings the uncached ``readahead`` chunks (the next-ranked hits, likely wanted by the next chunk:
        a read of 12 rows costs little more than one of 6, per-query overhead dominates)."""
        out = {c: tier.payloads.get(c) for c in chunk_indices}
        with self._lock:
            pending = (self._pending or {}).get(stream_id, {})
            out |= {c: pending[c][0] for c, p in out.items() if p is None and c in pending}
        missing = [c for c, p in out.items() if p is None]
        if missing:
            missing += [c for c in readahead if tier.payloads.peek(c) is None]
            table = self._table(stream_id, tier.pinned, refresh=True)
            fetched = fetch_chunks(table, stream_id, missing, keep_half=True)
            later = [c for c in missing if c not in fetched]  # observed after the pinned version
            if later and tier.pinned is not None:
                fetched |= fetch_chunks(self._table(stream_id, None, refresh=True), stream_id, later, keep_half=True)
            for c in missing:
                if c in fetched:
                    tier.payloads.put(c, fetched[c])
                if c in out:
                    if c not in fetched:
                        raise MemoryStoreError(f"{stream_id}[{c}]: in the hot tier but neither cached nor durable")
                    out[c] = fetched[c]
        return out

    def _search_cold(
        self, sid: str, q: np.ndarray, k: int, rng: CandidateRange, version: int | None
    ) -> list[RetrievedChunk]:
        with self._lock:  # before the table read (see _search_cold_ids)
            held = self._held_hits(sid, q, k, rng) if version is None else []
            payloads = {c: self._pending[sid][c][0] for c, _ in held}
        try:
            t = self._vector_search(self._table(sid, version, refresh=True), q, k, rng, PAYLOAD_COLUMNS)
        except UnknownStreamError:
            if not held:
                raise
            t = None
        if t is not None:
            scores = 1.0 - t.column("_distance").to_numpy().astype(np.float64)
            chunks = rows_to_chunks(t, sid, keep_half=True)
            payloads = {c.chunk_index: c for c in chunks} | payloads
            held = _merge([(c.chunk_index, float(s)) for c, s in zip(chunks, scores)], held)
        return [
            RetrievedChunk(c, payloads[c].first_frame, payloads[c].num_frames, s, payloads[c].latents)
            for c, s in held[:k]
        ]

    def prefetch(self, stream_id: str, query: np.ndarray, k: int, **kwargs) -> Future[list[RetrievedChunk]]:
        """Run :meth:`search` on a background thread (one worker, FIFO) and return its future.

        A generator issues the next chunk's retrieval as soon as its query embedding exists (right after
        the current chunk is denoised) and collects it after the re-cache pass and the writes.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-prefetch")
        return self._executor.submit(self.search, stream_id, query, k, **kwargs)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            tiers = list(self._tiers.values()) + list(self._pinned.values())
            self._tiers.clear()
            self._pinned.clear()
            self._tables.clear()
            self._cold_floor.clear()
            self._durable_since.clear()
            if self._pending is not None:
                self._pending.clear()
        for t in tiers:
            t.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
