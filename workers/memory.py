"""The generator's link to the memory store: publish each chunk, and search the stream's history.

``MemoryLink`` owns one :class:`~memory_store.writer.MemoryWriter` (durable, batched, asynchronous)
and one :class:`~memory_store.retriever.Retriever` (hot tier in this process). A published chunk is
searchable at once (``observe``) and durable after the writer's next commit.
"""

from __future__ import annotations

from dataclasses import replace

from memory_store.config import MemoryStoreConfig
from memory_store.embedders import PooledProjectionEmbedder
from memory_store.retriever import Retriever
from memory_store.schema import ChunkRecord
from memory_store.writer import MemoryWriter
from workers.config import ModelConfig
from workers.types import Chunk

CHECKPOINT_TAG = "ckpt-"


def checkpoint_tag(chunk: int) -> str:
    return f"{CHECKPOINT_TAG}{chunk:012d}"


def default_embedder(cfg: ModelConfig) -> PooledProjectionEmbedder:
    """The deterministic embedder every process of a run uses (same seed, same embeddings)."""
    return PooledProjectionEmbedder(cfg.latent_channels, dim=cfg.embedding_dim, seed=0)


def chunk_record(chunk: Chunk, model_hash: str) -> ChunkRecord:
    if chunk.embedding is None:
        raise ValueError(f"{chunk.stream_id}[{chunk.chunk_index}] has no embedding: give the generator an embedder")
    return ChunkRecord(
        stream_id=chunk.stream_id,
        chunk_index=chunk.chunk_index,
        first_frame=chunk.first_frame,
        num_frames=int(chunk.latents.shape[0]),
        embedding=chunk.embedding,
        latents=chunk.latents,
        model_hash=model_hash,
    )


class MemoryLink:
    """Writer + retriever over one database URI.

    Args:
        uri: LanceDB database URI (a local directory or any URI LanceDB accepts).
        cfg: the model config (embedding size, preset for the store's batching defaults).
    """

    def __init__(self, uri: str, cfg: ModelConfig, **store_overrides):
        self.config = self.store_config(uri, cfg, **store_overrides)
        self.model_hash = cfg.config_hash()
        self.writer = MemoryWriter(self.config)
        self.retriever = Retriever(self.config)
        self.retriever.attach_writer(self.writer)  # published payloads stay readable until durable

    @staticmethod
    def store_config(uri: str, cfg: ModelConfig, **overrides) -> MemoryStoreConfig:
        """The store's preset for ``cfg`` with ``overrides``. A budget left at its preset default is raised to
        what ``cfg``'s chunks need (2 chunks of encoded rows, 4 retrievals of payloads): defaults always hold."""
        from workers.memory_budget import chunk_payload_bytes, chunk_row_bytes

        wan = cfg.family == "wan" or cfg.name.startswith("wan")
        preset = MemoryStoreConfig.from_name("wan-1.3b" if wan else "tiny", uri=uri, embedding_dim=cfg.embedding_dim)
        defaults = {
            "encoded_row_cache_bytes": max(preset.encoded_row_cache_bytes, 2 * chunk_row_bytes(cfg)),
            "payload_cache_bytes": max(
                preset.payload_cache_bytes, 4 * cfg.retrieval_k * (chunk_payload_bytes(cfg) + 128)
            ),  # noqa: E501
        }
        return replace(preset, **{**defaults, **overrides})

    def open_stream(self, stream_id: str, version: int | None = None) -> None:
        """Warm the hot tier from the store (a resumed stream), pinned to ``version`` when given."""
        self.retriever.open_stream(stream_id, version=version, create=True)

    def publish(self, chunk: Chunk) -> None:
        record = chunk_record(chunk, self.model_hash)
        self.retriever.observe(record)
        self.writer.put(record)

    def rows(self, stream_id: str) -> int:
        """Chunks of the stream in the store, as this process sees them (its hot tier)."""
        return self.retriever.stream_rows(stream_id)

    def flush(self) -> None:
        """Block until every published chunk is durable."""
        self.writer.flush()

    def table_version(self, stream_id: str) -> int:
        """The stream's table version now (a checkpoint records it, to pin a resumed stream's reads)."""
        return self.writer.table_version(stream_id)

    def pin_checkpoint(self, stream_id: str, chunk: int) -> int:
        """Flush and tag the table version a checkpoint at ``chunk`` records, so version cleanup keeps
        it. Returns the pinned version. A resumed stream's reads stop following the version it resumed
        from: that version's tag may be released now, and cleanup then deletes files it references."""
        version = self.writer.pin_version(stream_id, checkpoint_tag(chunk))
        self.retriever.follow_latest(stream_id)
        return version

    def release_checkpoints(self, stream_id: str, kept_chunks: list[int]) -> None:
        """Drop the tags of checkpoints that are no longer kept."""
        keep = {checkpoint_tag(c) for c in kept_chunks}
        for tag in self.checkpoint_tags(stream_id):
            if tag not in keep:
                self.writer.unpin_version(stream_id, tag)

    def checkpoint_tags(self, stream_id: str) -> list[str]:
        from memory_store.db import connect, open_chunk_table

        table = open_chunk_table(connect(self.config), stream_id, self.config.embedding_dim, create=True)
        return sorted(t for t in table.tags.list() if t.startswith(CHECKPOINT_TAG))

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.retriever.close()

    def __enter__(self) -> MemoryLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
