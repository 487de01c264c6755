"""LanceDB access shared by the writer, the retriever, the hot tier and embedder training."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

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
    latents: torch.Tensor  # [F, C, H, W]: float32, or the stored float16 (keep_half)


WRITER_MALLOC_ARENAS = 2  # glibc malloc arenas in a process that writes (see limit_malloc_arenas)
_M_ARENA_MAX = -8  # mallopt parameter number (glibc malloc.h)


def limit_malloc_arenas(n: int = WRITER_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``n`` for this process, unless ``MALLOC_ARENA_MAX`` is set (then the
    environment decides); True when the cap was set. No-op off glibc.

    LanceDB and Lance each run a tokio runtime whose blocking pools grow to dozens of threads, and glibc
    gives threads their own arenas (up to 8 per core): each keeps the high-water mark of the
    compactions and commits that ran on it, so a writer's anonymous RSS crept up by ~16 KiB per commit
    over 6,000 commits with every LanceDB cache bounded; with two arenas it stays flat (bench/store_rss.py,
    docs/memory_store.md). New arenas are what the cap stops, so call it before the first LanceDB use.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, int(n)))
    except (OSError, AttributeError):
        return False


_CACHE_LOCK = threading.Lock()
_SESSIONS: dict[tuple, lancedb.Session] = {}
_CONNECTIONS: dict[tuple, lancedb.DBConnection] = {}


def session(config: MemoryStoreConfig) -> lancedb.Session:
    """The process's LanceDB session for ``config``'s cache sizes: one per (index, metadata) size pair.

    A session holds LanceDB's index cache and metadata cache (manifests, fragment and file metadata of
    every version a table handle has read). Without one, ``lancedb.connect`` uses the default session,
    whose caches are sized in GiB, i.e. unbounded here: a day-long writer's RSS grew with every commit.
    """
    key = (os.getpid(), config.lance_index_cache_bytes, config.lance_metadata_cache_bytes)
    with _CACHE_LOCK:
        s = _SESSIONS.get(key)
        if s is None:
            s = _SESSIONS[key] = lancedb.Session(
                index_cache_size_bytes=config.lance_index_cache_bytes,
                metadata_cache_size_bytes=config.lance_metadata_cache_bytes,
            )
        return s


def connect(config: MemoryStoreConfig) -> lancedb.DBConnection:
    """The database at ``config.uri`` (a directory, or any URI LanceDB accepts).

    One connection per process and (uri, storage options, cache sizes), shared by every caller and thread
    (the sync LanceDB API is thread-safe; table handles opened from it are not shared by this cache), on
    the bounded :func:`session`. Tables are opened at their latest version whatever the connection's age
    (``read_consistency_interval`` stays None: handles refresh explicitly with ``checkout_latest``).
    """
    opts = tuple(sorted((config.storage_options or {}).items()))
    key = (os.getpid(), config.uri, opts, config.lance_index_cache_bytes, config.lance_metadata_cache_bytes)
    with _CACHE_LOCK:
        db = _CONNECTIONS.get(key)
    if db is not None:
        return db
    db = lancedb.connect(config.uri, storage_options=config.storage_options, session=session(config))
    with _CACHE_LOCK:
        return _CONNECTIONS.setdefault(key, db)


def dataset_uri(config: MemoryStoreConfig, stream_id: str) -> str:
    """URI (a path for a local store) of ``stream_id``'s Lance dataset under ``config.uri``."""
    return f"{config.uri.rstrip('/')}/{table_name(stream_id)}.lance"


def disk_bytes(uri_or_path: str | os.PathLike) -> int:
    """Bytes of the files under a local directory: a stream's table (``dataset_uri``) or the whole store.

    Counts every file (data, ``_versions``, ``_transactions``, ``_deletions``, ``_indices``, ...); 0 when
    the path does not exist. Object-store URIs (``s3://`` ...) are not supported: ValueError.
    """
    s = os.fspath(uri_or_path)
    if "://" in s and not s.startswith("file://"):
        raise ValueError(f"disk_bytes: {s!r} is not a local path")
    root = Path(s.removeprefix("file://"))
    if root.is_file():
        return root.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # removed by a concurrent cleanup
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


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


def rows_to_chunks(t: pa.Table, stream_id: str, *, keep_half: bool = False) -> list[StoredChunk]:
    """Decode payload rows (columns of :data:`PAYLOAD_COLUMNS`), verifying each checksum."""
    d = t.select(PAYLOAD_COLUMNS).to_pydict()
    out = []
    for i, ci in enumerate(d["chunk_index"]):
        shape = d["latents_shape"][i]
        latents = decode_latents(
            d["latents"][i], shape, LATENT_DTYPE, d["checksum"][i], stream_id=stream_id, chunk_index=ci,
            keep_half=keep_half,
        )  # fmt: skip
        out.append(StoredChunk(ci, d["first_frame"][i], int(shape[0]), latents))
    return out


def fetch_chunks(table, stream_id: str, chunk_indices: list[int], *, keep_half: bool = False) -> dict[int, StoredChunk]:
    """Payloads of ``chunk_indices`` (those present) keyed by chunk index, checksums verified."""
    if not chunk_indices:
        return {}
    ids = ",".join(str(int(c)) for c in sorted(set(chunk_indices)))
    t = table.search().where(f"chunk_index IN ({ids})").select(PAYLOAD_COLUMNS).to_arrow()
    return {c.chunk_index: c for c in rows_to_chunks(t, stream_id, keep_half=keep_half)}
