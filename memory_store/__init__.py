"""LanceDB-backed latent history: every generated chunk becomes searchable memory.

Public API (what the generator and orchestrator use):

- :class:`MemoryStoreConfig` (config.py): where the store lives, batching, maintenance, retrieval.
- :class:`ChunkRecord` (schema.py): one generated chunk handed to the writer.
- :class:`MemoryWriter` (writer.py): batched, asynchronous, idempotent appends.
- :class:`Retriever` (retriever.py): top-k history for the next chunk (hot tier + LanceDB), prefetch,
  version pinning; policies :func:`longlive_rag_candidates`, :func:`adaptive_window_exclusion`.
- :class:`HotTier` (hot_tier.py): the in-process exact top-k over one stream's embeddings.
- Embedders (embedders.py, conv_ae.py): :class:`PooledProjectionEmbedder`, :class:`ConvAEEmbedder`,
  :func:`train_embedder`.
"""

from memory_store.config import MemoryStoreConfig
from memory_store.embedders import Embedder, PooledProjectionEmbedder
from memory_store.hot_tier import HotTier
from memory_store.policies import CandidateRange, adaptive_window_exclusion, longlive_rag_candidates
from memory_store.retriever import RetrievedChunk, Retriever
from memory_store.schema import (
    ChecksumError,
    ChunkRecord,
    MemoryStoreError,
    UnknownStreamError,
    chunk_schema,
    validate_stream_id,
)
from memory_store.writer import MemoryWriter

__all__ = [
    "CandidateRange",
    "ChecksumError",
    "ChunkRecord",
    "Embedder",
    "HotTier",
    "MemoryStoreConfig",
    "MemoryStoreError",
    "MemoryWriter",
    "PooledProjectionEmbedder",
    "RetrievedChunk",
    "Retriever",
    "UnknownStreamError",
    "adaptive_window_exclusion",
    "chunk_schema",
    "longlive_rag_candidates",
    "validate_stream_id",
]
