"""The hot tier: a stream's embedding matrix in the generator's process, searched exactly.

Rows live in a preallocated matrix that doubles when full. ``topk`` returns the exact cosine top-k over
the rows whose chunk index lies in ``[min_chunk_index, max_chunk_index_exclusive)`` minus ``exclude``.

At day scale (1M chunks x 64 floats = 256 MB of float32) one float32 mat-vec is bound by memory
bandwidth (~9 ms on a 2-core EPYC). On CPU the tier therefore keeps an int8 copy with one scale per
row (64 MB) and searches in two stages, still exactly:

1. approximate scores s~ = int8 mat-vec (``torch._weight_int8pack_mm``, bf16 out, ~2.7 ms at 1M);
2. with a per-query bound |s~ - s| <= delta (int8 rounding + bf16 rounding, formula in ``_delta``):
   re-score the k rows with the largest s~ in float32; the smallest of those k exact scores, s_lb, is
   at most the true k-th score s_k. Every true top-k row has s~ >= s - delta >= s_k - delta >=
   s_lb - delta, so the rows with s~ >= s_lb - delta (found through per-block maxima, 1024 rows per
   block) are re-scored in float32, and their top-k is the exact top-k.

Bounded: a tier holds at most ``max_rows`` chunks, the newest by chunk index. When an append would pass
that, the oldest 1/16 of the rows go (one copy of the matrix every ``max_rows / 16`` appends) and
:attr:`HotTier.floor` rises past them: chunks below it are searched in LanceDB (the retriever's cold
tier). The matrix doubles up to ``max_rows``, never past it, so a day-long stream's tier holds
``max_rows * row_bytes(E)`` bytes whatever its length.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog
import torch

log = structlog.get_logger(__name__)

_BLOCK = 1024  # rows per block for the block-maximum candidate search
_U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_INT8_OK: dict[int, bool] = {}  # embedding_dim -> int8 kernel passed its self-check on this machine
MAX_CHUNK_INDEX = 2**28  # chunk index -> row is a dense int32 array (1 GB at most; ~580 days of 16 fps)


@dataclass(frozen=True)
class Hits:
    """Result of :meth:`HotTier.topk`, best first (ties: lower chunk index first)."""

    chunk_indices: np.ndarray  # int64 [k']
    scores: np.ndarray  # float32 [k'], cosine similarity

    def __len__(self) -> int:
        return len(self.chunk_indices)


def payload_nbytes(value) -> int:
    """Bytes a cached payload holds (its latents tensor; a small constant for the rest)."""
    lat = getattr(value, "latents", None)
    return (lat.numel() * lat.element_size() if isinstance(lat, torch.Tensor) else 0) + 128


class PayloadCache:
    """Thread-safe LRU of payloads, keyed by chunk index, bounded in bytes (``capacity_bytes``; 0: off)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._d: OrderedDict[int, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, chunk_index: int):
        with self._lock:
            item = self._d.get(chunk_index)
            if item is None:
                self.misses += 1
                return None
            self._d.move_to_end(chunk_index)
            self.hits += 1
            return item[0]

    def peek(self, chunk_index: int):
        """Like :meth:`get` without touching recency or counters."""
        with self._lock:
            item = self._d.get(chunk_index)
            return None if item is None else item[0]

    def put(self, chunk_index: int, value) -> None:
        size = payload_nbytes(value)
        if size > self.capacity_bytes:  # off, or one payload larger than the whole budget
            return
        with self._lock:
            old = self._d.pop(chunk_index, None)
            if old is not None:
                self.nbytes -= old[1]
            self._d[chunk_index] = (value, size)
            self.nbytes += size
            while self.nbytes > self.capacity_bytes:
                _, (_, gone) = self._d.popitem(last=False)
                self.nbytes -= gone
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._d)


def int8_kernel_ok(dim: int) -> bool:
    """Whether the int8 x bf16 mat-vec kernel is usable for ``dim`` here (checked once against fp32)."""
    if dim not in _INT8_OK:
        ok = dim % 16 == 0 and hasattr(torch, "_weight_int8pack_mm")  # other sizes give garbage
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                x = torch.nn.functional.normalize(torch.randn(257, dim, generator=g), dim=1)
                q8, scale = _quantize(x)
                q = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
                approx = torch._weight_int8pack_mm(q.to(torch.bfloat16)[None], q8, scale)[0].float()
                exact = x @ q
                ok = bool((approx - exact).abs().max() <= _delta(q, float(scale.float().max()), dim))
            except Exception:  # noqa: BLE001 - any failure means "use the float32 path"
                ok = False
        _INT8_OK[dim] = ok
        log.debug("int8_kernel_check", dim=dim, ok=ok)
    return _INT8_OK[dim]


def _gather_blocks(approx: torch.Tensor, blocks: torch.Tensor, m: int) -> torch.Tensor:
    """Float scores of the given 1024-row blocks of ``approx`` (m,) as (len(blocks), BLOCK); the part of a
    partial last block past row m reads -inf."""
    full = m // _BLOCK
    view = approx[: full * _BLOCK].view(full, _BLOCK)  # (full*BLOCK,) -> (full, BLOCK)
    if full * _BLOCK == m or not bool((blocks == full).any()):
        return view[blocks].float()
    tail = torch.full((1, _BLOCK), float("-inf"), dtype=approx.dtype)
    tail[0, : m - full * _BLOCK] = approx[full * _BLOCK :]
    return torch.cat([view, tail])[blocks].float()


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (N, E) -> int8 (N, E) and bf16 scales (N,) with |x - q8 * scale| <= scale / 2."""
    amax = x.abs().amax(dim=1).clamp_min(1e-30)
    # round the scale up into bf16 so that |x / scale| <= 127 holds with the scale the kernel uses
    scale = (amax / 127.0 * (1 + 2.0**-7)).to(torch.bfloat16)
    q8 = torch.round(x / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q8, scale


def _delta(q: torch.Tensor, scale_max: float, dim: int) -> float:
    """Bound on |int8 score - float32 score| for unit rows and query ``q`` (float32, unit norm)."""
    qf = q.numpy().astype(np.float64)
    qb = q.to(torch.bfloat16).float().numpy().astype(np.float64)  # the query the kernel sees
    x_norm = 1.0 + math.sqrt(dim) * scale_max / 2  # norm of a dequantized unit row, at most
    e_quant = float(np.abs(qb).sum()) * scale_max / 2  # sum_j |qb_j| * |x_j - x~_j|
    e_query = float(np.linalg.norm(qf - qb)) * x_norm  # query rounded to bf16
    bound = float(np.linalg.norm(qb)) * x_norm  # |s~| before output rounding
    e_out = _U_BF16 * bound + 2 * dim * 2.0**-24 * bound  # bf16 output + float32 accumulation
    return 1.25 * (e_quant + e_query + e_out) + 1e-6


class HotTier:
    """Exact top-k over one stream's newest chunk embeddings, plus an LRU of payloads and a prefetch thread.

    Args:
        embedding_dim: E.
        device: where the embedding matrix lives ("cpu" or a CUDA device).
        capacity_hint: rows to preallocate; the matrix doubles when full, up to ``max_rows``.
        max_rows: most chunks held; past it the oldest go and :attr:`floor` rises (see the module doc).
        payload_cache_bytes: byte budget of :attr:`payloads`.
        quantize_min_rows: searches over at least this many rows use the exact two-stage int8 scan
            (CPU only, when the int8 kernel passes its self-check).
    """

    def __init__(
        self,
        embedding_dim: int,
        device: str | torch.device = "cpu",
        capacity_hint: int = 4096,
        *,
        max_rows: int = 65_536,
        payload_cache_bytes: int = 64 * 2**20,
        quantize_min_rows: int = 32768,
    ) -> None:
        if embedding_dim < 1:
            raise ValueError(f"{embedding_dim=} must be >= 1")
        if max_rows < 1:
            raise ValueError(f"{max_rows=} must be >= 1")
        self.dim = embedding_dim
        self.device = torch.device(device)
        self.max_rows = int(max_rows)
        self.quantize_min_rows = quantize_min_rows
        self.version: int | None = None  # table version it was loaded from (from_lancedb)
        self.pinned: int | None = None  # version a retriever pinned it to; None: it follows the latest
        self.payloads = PayloadCache(payload_cache_bytes)
        self._int8 = self.device.type == "cpu" and int8_kernel_ok(embedding_dim)
        self._lock = threading.Lock()
        self._n = 0
        self._sorted = True  # chunk indices strictly increasing in row order
        self._max_chunk = -1
        self._scale_max = 0.0
        self.floor = 0  # chunks below this index may have been dropped (they are searched in the cold tier)
        self.evicted = 0  # rows dropped so far
        cap = min(self.max_rows, max(16, int(capacity_hint)))
        self._emb = torch.empty(cap, embedding_dim, dtype=torch.float32, device=self.device)
        self._q8 = torch.empty(cap if self._int8 else 0, embedding_dim, dtype=torch.int8)
        self._scale = torch.empty(cap if self._int8 else 0, dtype=torch.bfloat16)
        self._chunks = np.empty(cap, dtype=np.int64)
        self._base = 0  # chunk index of _row_of[0]
        self._row_of = np.full(cap, -1, dtype=np.int32)  # chunk index - _base -> row
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ building

    def __len__(self) -> int:
        return self._n

    @staticmethod
    def row_bytes(embedding_dim: int, int8: bool = True) -> int:
        """Bytes one held chunk costs: float32 row, int8 copy and scale, chunk index, and the chunk -> row
        map (int32 over the held span plus growth headroom: at most two entries per row)."""
        return embedding_dim * 4 + (embedding_dim + 2 if int8 else 0) + 8 + 8

    @property
    def nbytes(self) -> int:
        """Bytes the tier's arrays hold now (its payload LRU not included)."""
        return (
            self._emb.numel() * 4
            + self._q8.numel()
            + self._scale.numel() * 2
            + self._chunks.nbytes
            + self._row_of.nbytes
        )

    @property
    def max_chunk_index(self) -> int:
        """Highest chunk index held (-1 when empty)."""
        return self._max_chunk

    def append(self, chunk_index: int, embedding) -> None:
        """Add (or replace) one chunk's embedding."""
        self.extend(np.asarray([chunk_index]), np.asarray(embedding, dtype=np.float32)[None])

    def extend(self, chunk_indices, embeddings) -> None:
        """Add (or replace) many rows: chunk_indices int [N], embeddings float [N, E]. Rows below
        :attr:`floor` are ignored (that history is the cold tier's); past ``max_rows`` the oldest go."""
        ci = np.asarray(chunk_indices, dtype=np.int64).reshape(-1)
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if emb.shape != (len(ci), self.dim):
            raise ValueError(f"embeddings.shape={tuple(emb.shape)}, expected ({len(ci)}, {self.dim})")
        if len(ci) == 0:
            return
        if ci.min() < 0 or ci.max() >= MAX_CHUNK_INDEX:
            raise ValueError(f"chunk indices must lie in [0, {MAX_CHUNK_INDEX}), got [{ci.min()}, {ci.max()}]")
        if not torch.isfinite(emb).all():
            raise ValueError("embeddings have non-finite values")
        _, last = np.unique(ci[::-1], return_index=True)  # a repeated chunk index: the last row wins
        keep = np.sort(len(ci) - 1 - last)
        keep = keep[ci[keep] >= self.floor]
        if len(keep) == 0:
            return
        ci, emb = ci[keep], emb[torch.from_numpy(keep)]
        emb = torch.nn.functional.normalize(emb, dim=1)  # cosine similarity = dot product of unit rows
        q8, scale = _quantize(emb) if self._int8 else (None, None)
        with self._lock:
            self._ensure_row_of(int(ci.min()), int(ci.max()))
            rows = self._row_of[ci - self._base].astype(np.int64)  # -1: new chunk; a replaced one keeps its row
            if self._n + int((rows < 0).sum()) > self.max_rows:
                self._evict(ci[rows < 0])
                kept = torch.from_numpy(np.nonzero(ci >= self.floor)[0])
                ci, emb = ci[kept.numpy()], emb[kept]
                if self._int8:
                    q8, scale = q8[kept], scale[kept]
                if len(ci) == 0:
                    return
                self._ensure_row_of(int(ci.min()), int(ci.max()))
                rows = self._row_of[ci - self._base].astype(np.int64)
            new = rows < 0
            old_n = self._n
            self._ensure_capacity(old_n + int(new.sum()))
            rows[new] = np.arange(old_n, old_n + int(new.sum()))
            self._n = old_n + int(new.sum())
            idx = torch.from_numpy(rows)
            self._emb[idx.to(self.device)] = emb.to(self.device)
            if self._int8:
                self._q8[idx] = q8
                self._scale[idx] = scale
                self._scale_max = max(self._scale_max, float(scale.float().max()))
            self._chunks[rows] = ci
            self._row_of[ci - self._base] = rows
            self._max_chunk = max(self._max_chunk, int(ci.max()))
            if self._sorted and self._n > old_n:  # new rows went to the end: still increasing?
                tail = self._chunks[max(old_n - 1, 0) : self._n]
                self._sorted = bool(np.all(np.diff(tail) > 0))

    def _evict(self, incoming: np.ndarray) -> None:
        """Make room for the ``incoming`` new chunk indices: over held + incoming, drop the oldest (by
        chunk index) down to ``max_rows``, in whole blocks of ``max_rows // 16``, and raise :attr:`floor`
        past them. For a stream's contiguous chunks the floor after n chunks is then
        ``block * ceil((n - max_rows) / block)`` however they arrived (one by one, or a warm start's
        bulk load), so a resumed stream splits its history where the original run did. Lock held."""
        chunks = self._chunks[: self._n]
        union = np.sort(np.concatenate([chunks, incoming]))
        block = max(1, self.max_rows // 16)
        drop = min(len(union), block * math.ceil((len(union) - self.max_rows) / block))
        new_floor = int(union[drop - 1]) + 1
        keep = np.nonzero(chunks >= new_floor)[0]  # rows kept, in row order (sorted stays sorted)
        n = len(keep)
        k = torch.from_numpy(keep)
        # searches in flight hold references to the old arrays: write the compacted rows into new ones
        emb = torch.empty_like(self._emb)
        emb[:n] = self._emb[k.to(self.device)]
        self._emb = emb
        if self._int8:
            q8, sc = torch.empty_like(self._q8), torch.empty_like(self._scale)
            q8[:n], sc[:n] = self._q8[k], self._scale[k]
            self._q8, self._scale = q8, sc
        kept_chunks = chunks[keep].copy()
        self._chunks = np.empty_like(self._chunks)
        self._chunks[:n] = kept_chunks
        self.evicted += self._n - n
        self._n = n
        self.floor = new_floor
        self._base = new_floor
        span = max(1, int(kept_chunks.max()) - new_floor + 1) if n else 1
        self._row_of = np.full(max(span, len(self._chunks)), -1, dtype=np.int32)
        if n:
            self._row_of[kept_chunks - new_floor] = np.arange(n, dtype=np.int32)
        log.debug("hot_tier_evicted", floor=new_floor, held=n)

    def _ensure_capacity(self, n: int) -> None:
        cap = len(self._chunks)
        if n <= cap:
            return
        new = min(max(n, 2 * cap), self.max_rows)
        emb = torch.empty(new, self.dim, dtype=torch.float32, device=self.device)
        emb[:cap] = self._emb
        self._emb = emb  # searches in flight keep a reference to the old matrix
        if self._int8:
            q8 = torch.empty(new, self.dim, dtype=torch.int8)
            q8[:cap] = self._q8
            scale = torch.empty(new, dtype=torch.bfloat16)
            scale[:cap] = self._scale
            self._q8, self._scale = q8, scale
        self._chunks = np.concatenate([self._chunks, np.empty(new - cap, dtype=np.int64)])

    def _ensure_row_of(self, lo: int, hi: int) -> None:
        """Make the chunk -> row map cover [lo, hi] (lo >= floor). Its size is the held chunk span."""
        if self._n == 0 and lo > self._base:
            self._base = lo  # an empty tier starts its map at its first chunk
            self._row_of[:] = -1
        if lo < self._base:
            grown = np.full(len(self._row_of) + self._base - lo, -1, dtype=np.int32)
            grown[self._base - lo :] = self._row_of
            self._row_of, self._base = grown, lo
        size = hi - self._base + 1
        if size > len(self._row_of):
            grown = np.full(max(size, min(2 * len(self._row_of), size + self.max_rows // 4)), -1, dtype=np.int32)
            grown[: len(self._row_of)] = self._row_of
            self._row_of = grown

    # ------------------------------------------------------------------ search

    def topk(
        self,
        query,
        k: int,
        max_chunk_index_exclusive: int,
        *,
        min_chunk_index: int = 0,
        exclude: Iterable[int] = (),
    ) -> Hits:
        """Exact cosine top-k among chunks in [min_chunk_index, max_chunk_index_exclusive) not in exclude.

        Args:
            query: float [E] (any norm; it is normalized).
            k: at most this many hits (fewer when fewer chunks qualify).
        Raises:
            ValueError: wrong query size, non-finite query, k < 0.
        """
        q = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(-1)
        if q.shape != (self.dim,) or not torch.isfinite(q).all():
            raise ValueError(f"query.shape={tuple(q.shape)} must be ({self.dim},) and finite")
        if k < 0:
            raise ValueError(f"{k=} must be >= 0")
        q = torch.nn.functional.normalize(q, dim=0)
        with self._lock:  # a consistent snapshot; appends after it are not seen
            n, emb, q8, scale = self._n, self._emb, self._q8, self._scale
            chunks, row_of, is_sorted, scale_max = self._chunks[: self._n], self._row_of, self._sorted, self._scale_max
            base = self._base
        lo_c, hi_c = int(min_chunk_index), int(max_chunk_index_exclusive)
        if is_sorted:
            lo, hi = int(np.searchsorted(chunks, lo_c)), int(np.searchsorted(chunks, hi_c))
            outside = None
        else:
            lo, hi = 0, n
            outside = np.nonzero((chunks < lo_c) | (chunks >= hi_c))[0]
        ex = np.fromiter(
            (c - base for c in exclude if lo_c <= c < hi_c and 0 <= c - base < len(row_of)), dtype=np.int64
        )
        ex_rows = row_of[ex].astype(np.int64) if len(ex) else ex
        ex_rows = ex_rows[ex_rows >= 0]
        ex_rows = ex_rows[(ex_rows >= lo) & (ex_rows < hi)]
        masked = ex_rows if outside is None else np.union1d(outside, ex_rows)
        kk = min(k, hi - lo - len(masked))
        if kk <= 0:
            return Hits(np.empty(0, np.int64), np.empty(0, np.float32))
        mask = torch.from_numpy(masked - lo) if len(masked) else None
        if self._int8 and hi - lo >= self.quantize_min_rows:
            rows, scores = self._topk_int8(q, kk, lo, hi, mask, emb, q8, scale, scale_max)
        else:
            rows, scores = self._topk_exact(q.to(self.device), kk, emb[lo:hi], mask)
            rows = rows + lo
        ci = chunks[rows]
        order = np.lexsort((ci, -scores))  # best first; ties by chunk index, so results are reproducible
        return Hits(ci[order], scores[order])

    @staticmethod
    def _topk_exact(q, k, block, mask) -> tuple[np.ndarray, np.ndarray]:
        s = block @ q  # (m, E) @ (E,) -> (m,)
        if mask is not None:
            s[mask.to(s.device)] = float("-inf")
        v, i = torch.topk(s, k)
        return i.cpu().numpy(), v.float().cpu().numpy()

    def _topk_int8(self, q, k, lo, hi, mask, emb, q8, scale, scale_max) -> tuple[np.ndarray, np.ndarray]:
        m = hi - lo
        approx = torch._weight_int8pack_mm(q.to(torch.bfloat16)[None], q8[lo:hi], scale[lo:hi])[0]  # (m,) bf16
        if mask is not None:
            approx[mask] = float("-inf")
        full = m // _BLOCK
        block_max = approx[: full * _BLOCK].view(full, _BLOCK).amax(dim=1)  # (full*BLOCK,) -> (full,)
        if full * _BLOCK < m:  # a partial last block
            block_max = torch.cat([block_max, approx[full * _BLOCK :].amax()[None]])
        block_max = block_max.float()
        # The k best approximate scores lie in the k blocks with the largest maxima. Their exact scores
        # give s_lb <= s_k (k rows score at least s_lb), so a top-k row has s~ >= s - delta >= s_lb - delta.
        top_blocks = torch.topk(block_max, min(k, len(block_max))).indices
        i = torch.topk(_gather_blocks(approx, top_blocks, m).flatten(), k).indices
        first = top_blocks[i // _BLOCK] * _BLOCK + i % _BLOCK + lo  # rows of the k best approximate scores
        s_lb = float((emb[first] @ q).min())
        thr = s_lb - _delta(q, scale_max, self.dim)
        cand_blocks = torch.nonzero(block_max >= thr).flatten()
        if len(cand_blocks) * _BLOCK > m // 4:  # near-ties everywhere: a full exact scan is as cheap
            rows, scores = self._topk_exact(q, k, emb[lo:hi], mask)
            return rows + lo, scores
        sel = torch.nonzero(_gather_blocks(approx, cand_blocks, m) >= thr)  # (c, 2): (block, offset)
        rows = cand_blocks[sel[:, 0]] * _BLOCK + sel[:, 1] + lo  # candidate rows, absolute
        exact = emb[rows] @ q  # (c, E) @ (E,) -> (c,)
        v, i = torch.topk(exact, k)
        return rows[i].numpy(), v.numpy()

    def prefetch(self, query, k: int, max_chunk_index_exclusive: int, **kwargs) -> Future[Hits]:
        """Run :meth:`topk` on a background thread; returns its future (one worker, FIFO)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hot-tier-prefetch")
        return self._executor.submit(self.topk, query, k, max_chunk_index_exclusive, **kwargs)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ warm start

    @classmethod
    def from_lancedb(
        cls, config, stream_id: str, *, version: int | None = None, device=None, quantize_min_rows: int = 32768
    ) -> HotTier:
        """Load ``stream_id``'s embeddings from the store (at ``version`` when given): the warm start of a
        resumed generator. Raises UnknownStreamError when the stream has no table."""
        from memory_store.db import connect, open_chunk_table, read_chunk_indices, read_embeddings

        table = open_chunk_table(connect(config), stream_id, config.embedding_dim, version=version)
        tier = cls(
            config.embedding_dim,
            device or config.hot_tier_device,
            max_rows=config.hot_tier_rows,
            payload_cache_bytes=config.payload_cache_bytes,
            quantize_min_rows=quantize_min_rows,
        )
        # only the newest rows are read: the floor is where appending every chunk one by one puts it
        held = read_chunk_indices(table)
        if len(held) > tier.max_rows:
            block = max(1, tier.max_rows // 16)
            drop = block * math.ceil((len(held) - tier.max_rows) / block)
            tier.floor = tier._base = int(held[drop - 1]) + 1
        ci, emb = read_embeddings(table, after_chunk=tier.floor - 1)
        tier._ensure_capacity(len(ci) + max(4096, len(ci) // 4))  # headroom for the rollout to come
        tier.extend(ci, emb)
        tier.version = table.version
        log.info("hot_tier_loaded", stream_id=stream_id, rows=len(ci), floor=tier.floor, version=table.version)
        return tier
