"""Configuration of the memory store: one dataclass, validated at construction, with named presets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

INDEX_TYPES = ("IVF_HNSW_SQ", "IVF_PQ", "IVF_FLAT")


@dataclass
class MemoryStoreConfig:
    """Where the latent history lives and how it is written, maintained and searched.

    ``uri`` is handed to ``lancedb.connect`` unchanged when it has a scheme (``s3://bucket/prefix``,
    ``gs://``, ...); a plain path is made absolute so that every process of a run (they may start in
    different working directories) opens the same directory.
    """

    uri: str = "memory"  # LanceDB database URI; the orchestrator passes <run dir>/memory
    embedding_dim: int = 64  # floats per chunk embedding; fixed per table
    # --- writer ---
    batch_size: int = 64  # most chunks in one commit (per stream, one merge_insert per stream per batch)
    flush_interval_s: float = 0.5  # longest a put chunk waits for its batch to fill before it is committed
    queue_max: int = 256  # bounded queue between put() and the commit thread; put blocks when full
    commit_retries: int = 3  # retries (with backoff) of a failed commit before the writer gives up
    # --- maintenance (a second thread of the writer) ---
    compact_every_n_commits: int = 32  # compact a stream's small fragments after this many commits to it
    keep_versions: int = 16  # newest table versions kept by cleanup (pinned/tagged versions are kept too)
    index_threshold_rows: int = 100_000  # below: exact (flat) search; at or above: a vector index
    index_rebuild_growth: float = 2.0  # retrain the vector index when the table grew by this factor
    index_type: str = "IVF_HNSW_SQ"  # LanceDB vector index used above the threshold
    # --- retrieval ---
    nprobes: int = 20  # IVF partitions probed by an indexed LanceDB search
    refine_factor: int = 4  # an indexed search re-ranks k * refine_factor candidates exactly
    payload_cache_bytes: int = 64 * 2**20  # LRU of payloads per stream in the generator process, in bytes
    payload_readahead: int = 6  # on a payload miss, also read the next-ranked hits' payloads into the LRU
    hot_tier: bool = True  # search through an in-process embedding matrix (exact); False: LanceDB only
    hot_tier_device: str = "cpu"  # device of the hot tier's embedding matrix
    # newest chunks per stream whose embeddings the hot tier holds (and searches exactly); older history
    # is searched through LanceDB (its vector index once built): the two-tier search (memory_store.retriever)
    hot_tier_rows: int = 65_536
    # generator side: per stream, the encoded memory rows of retrieved chunks (on the model's device), in
    # bytes; 0 turns the cache off (every newly retrieved chunk is encoded again)
    encoded_row_cache_bytes: int = 8 * 2**20
    # --- LanceDB's own caches (one session per connection; unbounded they grow with every version read) ---
    lance_index_cache_bytes: int = 32 * 2**20
    lance_metadata_cache_bytes: int = 32 * 2**20
    fragment_target_bytes: int = 128 * 2**20  # compaction writes data files of about this size, never larger
    storage_options: dict[str, str] | None = field(default=None, repr=False)  # object-store credentials

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"{self.uri=} must be a non-empty string")
        if "://" not in self.uri:
            self.uri = os.path.abspath(os.path.expanduser(self.uri))
        for name in ("embedding_dim", "batch_size", "queue_max", "compact_every_n_commits", "keep_versions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("hot_tier_rows", "lance_index_cache_bytes", "lance_metadata_cache_bytes", "fragment_target_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("commit_retries", "payload_cache_bytes", "payload_readahead", "index_threshold_rows",
                     "encoded_row_cache_bytes"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not self.flush_interval_s > 0:
            raise ValueError(f"{self.flush_interval_s=} must be > 0")
        if not self.index_rebuild_growth > 1:
            raise ValueError(f"{self.index_rebuild_growth=} must be > 1")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"{self.index_type=} must be one of {INDEX_TYPES}")
        if self.nprobes < 1 or self.refine_factor < 1:
            raise ValueError(f"{self.nprobes=} and {self.refine_factor=} must be >= 1")

    @classmethod
    def from_name(cls, name: str, **overrides) -> MemoryStoreConfig:
        """A named preset (``tiny``, ``wan-1.3b``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"{name=} is not a preset; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # small payloads, CPU. A commit costs ~10 ms of CPU whatever its size: at most one a second per stream
    # (a crash loses nothing: recovery regenerates from the checkpoint, which pins its own version)
    # Budgets in proportion to its ~5-20 kB chunks: they fill within the first few thousand chunks
    # (RSS is flat after that), and compaction's rewritten tail stays small beside the payload.
    "tiny": dict(
        embedding_dim=64,
        batch_size=32,
        flush_interval_s=1.0,
        queue_max=256,
        payload_cache_bytes=8 * 2**20,
        lance_index_cache_bytes=8 * 2**20,
        lance_metadata_cache_bytes=8 * 2**20,
        fragment_target_bytes=16 * 2**20,
    ),
    # Wan2.1-1.3B chunks are ~600 KB of float16 latents: a shorter queue bounds host memory (~40 MB)
    # The payload LRU holds ~200 chunks; one chunk's encoded rows (MHA, 30 layers) are ~860 MB of GPU memory
    "wan-1.3b": dict(
        embedding_dim=64,
        batch_size=16,
        flush_interval_s=1.0,
        queue_max=64,
        payload_cache_bytes=128 * 2**20,
        encoded_row_cache_bytes=2**30,
    ),
}
