"""LanceDB access shared by the writer, the retriever, the hot tier and embedder training."""

from __future__ import annotations

from dataclasses import dataclass

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from memory_store.config import MemoryStoreConfig
from memory_store.schema import (
    LATENT_DTYPE,
    MemoryStoreError,
    UnknownStreamError,
    chunk_schema,
    decode_latents,
    embedding_dim_of,
    stream_id_of_table,
    table_name,
)

# Columns read to return a payload. num_frames is latents_shape[0] (the writer checks it) and the dtype is
# LATENT_DTYPE (the checksum covers it): low-cardinality columns cost ~2 ms each per random-access read
# at 1M rows in LanceDB 0.40, more than the latents themselves.
PAYLOAD_COLUMNS = ["chunk_index", "first_frame", "latents", "latents_shape", "checksum"]


@dataclass(frozen=True)
class StoredChunk:
    """A chunk's payload read back (checksum verified)."""

    chunk_index: int
    first_frame: int
    num_frames: int
    latents: torch.Tensor  # float32 [F, C, H, W]


def connect(config: MemoryStoreConfig) -> lancedb.DBConnection:
    """Open the database at ``config.uri`` (a directory, or any URI LanceDB accepts)."""
    return lancedb.connect(config.uri, storage_options=config.storage_options)


def table_exists(db: lancedb.DBConnection, name: str) -> bool:
    token = None
    while True:
        page = db.list_tables(page_token=token, limit=1000)
        if name in page.tables:
            return True
        token = page.page_token
        if not token:
            return False


def list_streams(db: lancedb.DBConnection) -> list[str]:
    """Stream ids that have a table in the database, sorted."""
    out, token = [], None
    while True:
        page = db.list_tables(page_token=token, limit=1000)
        out += [s for s in map(stream_id_of_table, page.tables) if s is not None]
        token = page.page_token
        if not token:
            return sorted(out)


def open_chunk_table(
    db: lancedb.DBConnection,
    stream_id: str,
    embedding_dim: int,
    *,
    create: bool = False,
    version: int | None = None,
):
    """Open (or create) ``stream_id``'s table, optionally checked out at ``version``.

    Raises:
        UnknownStreamError: the table does not exist and ``create`` is False.
        ValueError: the table's embedding size differs from ``embedding_dim``.
        MemoryStoreError: ``version`` does not exist (never written, or removed by cleanup).
    """
    name = table_name(stream_id)
    try:
        table = db.open_table(name) if version is None else db.open_table(name, version=version)
    except ValueError as e:
        if table_exists(db, name):
            if version is not None:
                raise MemoryStoreError(f"{stream_id}: table version {version} does not exist ({e})") from e
            raise
        if not create or version is not None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}: no table {name!r} in the store") from e
        try:
            table = db.create_table(name, schema=chunk_schema(embedding_dim))
        except ValueError:  # another process created it between our open and our create
            table = db.open_table(name)
    dim = embedding_dim_of(table.schema)
    if dim != embedding_dim:
        raise ValueError(f"{stream_id}: the stored embedding size is {dim}, the config says {embedding_dim}")
    return table


def read_embeddings(table, *, after_chunk: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """All (chunk_index, embedding) rows with chunk_index > ``after_chunk``, sorted by chunk_index.

    Returns:
        chunk_indices: int64 [N]; embeddings: float32 [N, E]. Duplicated chunk indices (impossible through
        the writer, tolerated here) keep one row.
    """
    query = table.search().select(["chunk_index", "embedding"])
    if after_chunk >= 0:
        query = query.where(f"chunk_index > {int(after_chunk)}")
    t = query.to_arrow()
    dim = embedding_dim_of(table.schema)
    ci = t.column("chunk_index").to_numpy()
    flat = pc.list_flatten(t.column("embedding")).to_numpy(zero_copy_only=False)
    emb = flat.astype(np.float32, copy=False).reshape(len(ci), dim)  # (N*E,) -> (N, E)
    ci, first = np.unique(ci, return_index=True)
    return ci.astype(np.int64), np.ascontiguousarray(emb[first])


def read_chunk_indices(table) -> np.ndarray:
    """Sorted unique chunk indices present in ``table``'s checked-out version."""
    t = table.search().select(["chunk_index"]).to_arrow()
    return np.unique(t.column("chunk_index").to_numpy()).astype(np.int64)


def contiguous_prefix_end(sorted_indices: np.ndarray) -> int:
    """Largest d such that chunks 0..d are all present; -1 when chunk 0 is missing."""
    n = len(sorted_indices)
    if n == 0:
        return -1
    gaps = np.nonzero(sorted_indices != np.arange(n))[0]
    return n - 1 if len(gaps) == 0 else int(gaps[0]) - 1


def rows_to_chunks(t: pa.Table, stream_id: str) -> list[StoredChunk]:
    """Decode payload rows (columns of :data:`PAYLOAD_COLUMNS`), verifying each checksum."""
    d = t.select(PAYLOAD_COLUMNS).to_pydict()
    out = []
    for i, ci in enumerate(d["chunk_index"]):
        shape = d["latents_shape"][i]
        latents = decode_latents(
            d["latents"][i], shape, LATENT_DTYPE, d["checksum"][i], stream_id=stream_id, chunk_index=ci
        )
        out.append(StoredChunk(ci, d["first_frame"][i], int(shape[0]), latents))
    return out


def fetch_chunks(table, stream_id: str, chunk_indices: list[int]) -> dict[int, StoredChunk]:
    """Payloads of ``chunk_indices`` (those present) keyed by chunk index, checksums verified."""
    if not chunk_indices:
        return {}
    ids = ",".join(str(int(c)) for c in sorted(set(chunk_indices)))
    t = table.search().where(f"chunk_index IN ({ids})").select(PAYLOAD_COLUMNS).to_arrow()
    return {c.chunk_index: c for c in rows_to_chunks(t, stream_id)}
