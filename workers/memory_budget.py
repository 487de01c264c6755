"""Declared byte bounds of everything a stream holds besides its KV cache, from the configs.

Each figure is the bound its structure enforces in code (the column "enforced by"); `longroll plan`
prints them per stream, per worker and on disk per stream-hour, and `run`/`generate` refuse a budget
that cannot hold one chunk. Where a structure is shared by a worker's streams it is counted per worker.

| structure | where | bound | enforced by |
|---|---|---|---|
| hot tier | host | ``hot_tier_rows * row_bytes`` | ``HotTier`` drops its oldest rows past ``max_rows`` |
| payload cache | host | ``payload_cache_bytes`` | ``PayloadCache`` evicts by bytes |
| encoded memory rows | device | ``encoded_row_cache_bytes`` | ``Generator._remember_rows`` evicts by bytes |
| prefetch | host | one search in flight per stream: ``(k + readahead)`` payloads | ``Generator._prefetch`` |
| writer queue | host, per worker | ``queue_max`` encoded chunks | ``MemoryWriter``'s bounded queue |
| LanceDB caches | host, per worker | index + metadata cache bytes | the connection's ``lancedb.Session`` |
| telemetry | orchestrator | samples, previews, log lines: fixed counts | ``orchestrator.telemetry`` deques |
| disk | store | payload per stream-hour x the overhead bound | ``memory_store.maintenance`` |
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from memory_store.config import MemoryStoreConfig
from memory_store.hot_tier import HotTier
from workers.config import ModelConfig

PAYLOAD_DTYPE_BYTES = 2  # the store keeps latents as float16; the payload LRU holds them as stored


def chunk_payload_bytes(cfg: ModelConfig) -> int:
    """One chunk's stored latents: F x C x H x W float16."""
    return cfg.frames_per_chunk * cfg.latent_channels * cfg.latent_height * cfg.latent_width * PAYLOAD_DTYPE_BYTES


def chunk_row_bytes(cfg: ModelConfig) -> int:
    """One chunk's encoded memory rows: its frames' cache rows in every layer (fp8 scales included)."""
    return math.ceil(cfg.cache_layout().bytes_per_token() * cfg.tokens_per_frame * cfg.frames_per_chunk)


def telemetry_bytes(cfg: ModelConfig, upscale: int = 4) -> int:
    """Upper bound of one stream's dashboard telemetry: sample history, log tail and newest previews
    (a PNG is at most its raw pixels plus headers)."""
    from orchestrator.telemetry import HISTORY, LOG_LINES, PREVIEWS

    stride_h, stride_w = cfg.vae_stride[1], cfg.vae_stride[2]
    frame = cfg.latent_height * stride_h * upscale * cfg.latent_width * stride_w * upscale * 3
    return HISTORY * 200 + LOG_LINES * 1024 + PREVIEWS * (frame + 4096)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes, per stream unless named per worker."""

    hot_tier: int
    payload_cache: int
    encoded_rows: int  # on the model's device
    prefetch: int
    telemetry: int
    writer_queue_per_worker: int
    lance_caches_per_worker: int
    chunk_payload: int
    chunk_rows: int

    @property
    def host_per_stream(self) -> int:
        return self.hot_tier + self.payload_cache + self.prefetch

    def to_dict(self) -> dict:
        return {**asdict(self), "host_per_stream": self.host_per_stream}


def memory_budget(cfg: ModelConfig, store: MemoryStoreConfig, upscale: int | None = None) -> MemoryBudget:
    """The declared bounds of ``cfg`` streams with ``store``'s settings. Retrieval structures count only
    in retrieval mode (the others publish chunks but never search or encode them)."""
    payload = chunk_payload_bytes(cfg)
    retrieval = cfg.memory == "retrieval"
    k = cfg.retrieval_k if retrieval else 0
    return MemoryBudget(
        hot_tier=store.hot_tier_rows * HotTier.row_bytes(store.embedding_dim) if retrieval else 0,
        payload_cache=store.payload_cache_bytes if retrieval else 0,
        encoded_rows=store.encoded_row_cache_bytes if retrieval else 0,
        prefetch=(k + store.payload_readahead) * payload if retrieval else 0,
        telemetry=telemetry_bytes(cfg, upscale or (1 if cfg.family == "wan" else 4)),  # run's default upscale
        writer_queue_per_worker=store.queue_max * (payload + store.embedding_dim * 4 + 512),
        lance_caches_per_worker=store.lance_index_cache_bytes + store.lance_metadata_cache_bytes,
        chunk_payload=payload,
        chunk_rows=chunk_row_bytes(cfg),
    )


def budget_problems(cfg: ModelConfig, store: MemoryStoreConfig) -> list[str]:
    """Budgets that cannot hold what one chunk needs (empty: the budget is usable)."""
    if cfg.memory != "retrieval":
        return []
    payload, rows = chunk_payload_bytes(cfg), chunk_row_bytes(cfg)
    out = []
    if store.payload_cache_bytes < payload * cfg.retrieval_k:
        out.append(
            f"--payload-cache {store.payload_cache_bytes:,} B cannot hold one chunk's retrieval "
            f"({cfg.retrieval_k} payloads of {payload:,} B)"
        )
    if 0 < store.encoded_row_cache_bytes < rows:
        out.append(
            f"--encoded-row-cache {store.encoded_row_cache_bytes:,} B cannot hold one chunk's encoded rows "
            f"({rows:,} B; 0 turns the cache off)"
        )
    need_rows = cfg.window_chunks + cfg.memory_exclude_recent + cfg.retrieval_k
    if store.hot_tier_rows < need_rows:
        out.append(f"--hot-tier-rows {store.hot_tier_rows} must be at least {need_rows} (window + R + k chunks)")
    return out


def disk_overhead(store: MemoryStoreConfig, row_bytes: int) -> tuple[float, int]:
    """Bound on a stream's store disk bytes between maintenance passes, as (factor on the payload a
    long stream writes, constant bytes once per stream): memory_store.maintenance's
    ``disk_overhead_bound`` and ``disk_pileup_bytes``."""
    from memory_store.maintenance import disk_overhead_bound, disk_pileup_bytes

    return disk_overhead_bound(store, row_bytes), disk_pileup_bytes(store, row_bytes)
