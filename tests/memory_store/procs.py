"""Deterministic chunk factory and the bodies of the child processes used by the memory store tests.

Children are started with the ``spawn`` method (LanceDB is not fork-safe), so everything here must be
importable from a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from memory_store.config import MemoryStoreConfig
from memory_store.schema import ChunkRecord

DIM = 16  # embedding size used by the tests
SHAPE = (2, 4, 4, 4)  # (F, C, H, W) of a test chunk: small payloads keep the process tests fast


def _seed(stream_id: str, chunk_index: int, salt: str) -> int:
    h = hashlib.blake2b(f"{stream_id}/{chunk_index}/{salt}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def make_embedding(stream_id: str, chunk_index: int, dim: int = DIM) -> np.ndarray:
    g = np.random.default_rng(_seed(stream_id, chunk_index, "emb"))
    v = g.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def make_record(
    stream_id: str, chunk_index: int, *, dim: int = DIM, shape=SHAPE, model_hash: str = "m0", salt: str = ""
) -> ChunkRecord:
    """Chunk ``chunk_index`` of ``stream_id``: the same inputs always give the same record (as a
    deterministic generator would regenerate it)."""
    g = torch.Generator().manual_seed(_seed(stream_id, chunk_index, "lat" + salt))
    latents = torch.randn(*shape, generator=g)
    return ChunkRecord(
        stream_id=stream_id,
        chunk_index=chunk_index,
        first_frame=chunk_index * shape[0],
        num_frames=shape[0],
        embedding=make_embedding(stream_id, chunk_index, dim),
        latents=latents,
        model_hash=model_hash,
    )


def append_chunks(uri: str, stream_ids: list[str], n_chunks: int, start: int = 0, batch_size: int = 64) -> None:
    """Child: write chunks start..n_chunks-1 of every stream (interleaved), flush, exit."""
    from memory_store.writer import MemoryWriter

    cfg = MemoryStoreConfig(
        uri=uri, embedding_dim=DIM, batch_size=batch_size, flush_interval_s=0.05, compact_every_n_commits=8
    )
    with MemoryWriter(cfg) as w:
        for i in range(start, n_chunks):
            for sid in stream_ids:
                w.put(make_record(sid, i))
        w.flush()


def append_forever(uri: str, stream_id: str, ready_path: str) -> None:
    """Child: write chunks 0, 1, 2, ... of one stream until killed; touch ``ready_path`` once data is durable."""
    from memory_store.writer import MemoryWriter

    cfg = MemoryStoreConfig(uri=uri, embedding_dim=DIM, batch_size=16, flush_interval_s=0.01, compact_every_n_commits=4)
    shape = (2, 4, 16, 16)  # larger payloads: a commit takes long enough to be killed in the middle
    w = MemoryWriter(cfg)
    i = 0
    while True:
        w.put(make_record(stream_id, i, shape=shape))
        i += 1
        if i == 64:
            w.flush()
            with open(ready_path, "w") as f:
                f.write(str(os.getpid()))
        if i % 200 == 0:
            time.sleep(0.001)
