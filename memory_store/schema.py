"""The one typed schema of the memory store, the record a generator hands to the writer, and its codec.

Layout: one LanceDB table per stream (``chunks_<stream_id>``) in one database URI. A row is one generated
chunk: its position in the stream, a fixed-size embedding for retrieval, and the clean chunk latents
stored as float16 bytes plus their shape. ``checksum`` covers the payload (dtype, shape, bytes) and is
verified on every read, so a torn or corrupted payload is reported instead of being fed to a generator.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import torch

STREAM_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_STREAM_ID_RE = re.compile(STREAM_ID_PATTERN)
TABLE_PREFIX = "chunks_"
SCHEMA_VERSION = "1"
LATENT_DTYPE = "float16"  # the compact on-disk dtype of the latents payload
# LanceDB marks a column as the table's (unenforced) primary key through this field metadata. With it,
# concurrent merge_insert commits on the same key detect each other and retry instead of both inserting.
_PRIMARY_KEY_META = {"lance-schema:unenforced-primary-key": "true"}


class MemoryStoreError(RuntimeError):
    """A runtime failure of the memory store (a failed commit, a closed writer, a missing version)."""


class ChecksumError(ValueError):
    """A stored payload does not match its checksum."""


class UnknownStreamError(LookupError):
    """The stream has no table in the database (and nothing was observed for it in this process)."""


def validate_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` if it matches ``^[a-z0-9][a-z0-9_-]{0,63}$``, else raise ValueError."""
    if not isinstance(stream_id, str) or _STREAM_ID_RE.fullmatch(stream_id) is None:
        raise ValueError(f"{stream_id=} must match {STREAM_ID_PATTERN}")
    return stream_id


def table_name(stream_id: str) -> str:
    """Name of the LanceDB table holding ``stream_id``'s chunks."""
    return TABLE_PREFIX + validate_stream_id(stream_id)


def stream_id_of_table(name: str) -> str | None:
    """Inverse of :func:`table_name`; None for tables that are not chunk tables."""
    if not name.startswith(TABLE_PREFIX):
        return None
    sid = name[len(TABLE_PREFIX) :]
    return sid if _STREAM_ID_RE.fullmatch(sid) else None


def chunk_schema(embedding_dim: int) -> pa.Schema:
    """The pyarrow schema of a chunk table whose embeddings have ``embedding_dim`` floats."""
    if embedding_dim < 1:
        raise ValueError(f"{embedding_dim=} must be >= 1")
    return pa.schema(
        [
            pa.field("stream_id", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int64(), nullable=False, metadata=_PRIMARY_KEY_META),
            pa.field("first_frame", pa.int64(), nullable=False),  # first latent frame of the chunk
            pa.field("num_frames", pa.int32(), nullable=False),  # latent frames in the chunk
            pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False),
            pa.field("latents", pa.binary(), nullable=False),  # float16, C order, shape below
            pa.field("latents_shape", pa.list_(pa.int32(), 4), nullable=False),  # (F, C, H, W)
            pa.field("latents_dtype", pa.string(), nullable=False),
            pa.field("model_hash", pa.string(), nullable=False),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("checksum", pa.string(), nullable=False),
        ],
        metadata={"longroll.schema_version": SCHEMA_VERSION, "longroll.embedding_dim": str(embedding_dim)},
    )


def embedding_dim_of(schema: pa.Schema) -> int:
    """Embedding size of an existing chunk table's schema."""
    return schema.field("embedding").type.list_size


def payload_checksum(latents: bytes, shape: tuple[int, ...], dtype: str = LATENT_DTYPE) -> str:
    """blake2b-128 over dtype, shape and payload bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(dtype.encode())
    h.update(np.asarray(shape, dtype="<i8").tobytes())
    h.update(latents)
    return h.hexdigest()


@dataclass
class ChunkRecord:
    """One generated chunk, as the generator hands it to :class:`memory_store.writer.MemoryWriter`.

    ``created_at`` is set by the writer when None. ``checksum`` is computed by the writer; if the caller
    passes one (e.g. re-putting a record read back), it must match the payload.
    """

    stream_id: str
    chunk_index: int
    first_frame: int
    num_frames: int
    embedding: np.ndarray  # float32 [E], L2-normalized by the embedders
    latents: torch.Tensor  # float [F, C, H, W]; stored as float16
    model_hash: str
    created_at: datetime | None = None
    checksum: str | None = None


@dataclass(frozen=True)
class EncodedChunk:
    """A validated record with its payload already serialized: immutable, safe to queue across threads."""

    stream_id: str
    chunk_index: int
    first_frame: int
    num_frames: int
    embedding: np.ndarray  # float32 [E], a private copy
    latents: bytes
    latents_shape: tuple[int, int, int, int]
    model_hash: str
    created_at: datetime
    checksum: str


def encode_record(record: ChunkRecord, embedding_dim: int) -> EncodedChunk:
    """Validate ``record`` and serialize its payload.

    Raises:
        ValueError: bad stream id, negative indices, wrong embedding size, non-finite values, latents
            that are not [F, C, H, W] with F == num_frames or do not fit in float16.
        ChecksumError: the record carries a checksum that does not match its payload.
    """
    sid = validate_stream_id(record.stream_id)
    ci, ff, nf = int(record.chunk_index), int(record.first_frame), int(record.num_frames)
    if ci < 0 or ff < 0 or nf < 1:
        raise ValueError(f"{sid}: chunk_index={ci}, first_frame={ff} must be >= 0 and num_frames={nf} >= 1")
    emb = np.asarray(record.embedding, dtype=np.float32)
    if emb.shape != (embedding_dim,):
        raise ValueError(f"{sid}[{ci}]: embedding.shape={emb.shape}, the store expects ({embedding_dim},)")
    if not np.isfinite(emb).all():
        raise ValueError(f"{sid}[{ci}]: embedding has non-finite values")
    lat = record.latents
    if not isinstance(lat, torch.Tensor) or lat.dim() != 4 or not lat.is_floating_point():
        raise ValueError(f"{sid}[{ci}]: latents must be a float tensor [F, C, H, W], got {_describe(lat)}")
    if lat.shape[0] != nf:
        raise ValueError(f"{sid}[{ci}]: latents.shape={tuple(lat.shape)} has F != num_frames={nf}")
    half = lat.detach().to(device="cpu", dtype=torch.float16).contiguous()
    if not torch.isfinite(half).all():
        raise ValueError(f"{sid}[{ci}]: latents have non-finite values or overflow float16")
    payload = half.numpy().tobytes()
    shape = tuple(int(s) for s in half.shape)
    checksum = payload_checksum(payload, shape)
    if record.checksum is not None and record.checksum != checksum:
        raise ChecksumError(f"{sid}[{ci}]: record checksum {record.checksum} != payload checksum {checksum}")
    created = record.created_at or datetime.now(UTC)
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return EncodedChunk(sid, ci, ff, nf, emb.copy(), payload, shape, str(record.model_hash), created, checksum)


def encoded_to_table(rows: list[EncodedChunk], schema: pa.Schema) -> pa.Table:
    """Columnar batch of encoded chunks in the table's schema."""
    dim = embedding_dim_of(schema)
    emb = np.stack([r.embedding for r in rows]).astype(np.float32, copy=False)  # (N, E)
    shapes = np.asarray([r.latents_shape for r in rows], dtype=np.int32)  # (N, 4)
    cols = {
        "stream_id": pa.array([r.stream_id for r in rows], pa.string()),
        "chunk_index": pa.array([r.chunk_index for r in rows], pa.int64()),
        "first_frame": pa.array([r.first_frame for r in rows], pa.int64()),
        "num_frames": pa.array([r.num_frames for r in rows], pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        "latents": pa.array([r.latents for r in rows], pa.binary()),
        "latents_shape": pa.FixedSizeListArray.from_arrays(pa.array(shapes.reshape(-1)), 4),
        "latents_dtype": pa.array([LATENT_DTYPE] * len(rows), pa.string()),
        "model_hash": pa.array([r.model_hash for r in rows], pa.string()),
        "created_at": pa.array([r.created_at for r in rows], pa.timestamp("us", tz="UTC")),
        "checksum": pa.array([r.checksum for r in rows], pa.string()),
    }
    return pa.table(cols, schema=schema)


def decode_latents(
    payload: bytes,
    shape: tuple[int, ...],
    dtype: str,
    checksum: str,
    *,
    stream_id: str,
    chunk_index: int,
    keep_half: bool = False,
) -> torch.Tensor:
    """Verify a stored payload against its checksum and return it as a tensor [F, C, H, W]: float32, or
    with ``keep_half`` the stored float16 (half the bytes, same values: what caches hold).

    Raises:
        ChecksumError: the payload, shape or dtype do not match ``checksum``.
    """
    shape = tuple(int(s) for s in shape)
    if payload_checksum(payload, shape, dtype) != checksum:
        raise ChecksumError(f"{stream_id}[{chunk_index}]: stored latents fail their checksum")
    if dtype != LATENT_DTYPE:
        raise ValueError(f"{stream_id}[{chunk_index}]: unsupported stored dtype {dtype!r}")
    arr = np.frombuffer(payload, dtype=np.float16).reshape(shape)
    return torch.from_numpy(arr.copy() if keep_half else arr.astype(np.float32))


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__
