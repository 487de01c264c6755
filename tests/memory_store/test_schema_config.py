from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from memory_store.config import MemoryStoreConfig
from memory_store.schema import (
    ChecksumError,
    chunk_schema,
    decode_latents,
    encode_record,
    encoded_to_table,
    stream_id_of_table,
    table_name,
    validate_stream_id,
)
from tests.memory_store.procs import DIM, make_record


@pytest.mark.parametrize("sid", ["a", "0", "cam-7", "stream_01", "x" * 64])
def test_valid_stream_ids(sid):
    assert validate_stream_id(sid) == sid
    assert stream_id_of_table(table_name(sid)) == sid


@pytest.mark.parametrize("sid", ["", "A", "-a", "_a", "a b", "a/b", "x" * 65, "é", None, 3])
def test_invalid_stream_ids(sid):
    with pytest.raises(ValueError, match="must match"):
        validate_stream_id(sid)


def test_schema_is_typed_and_keyed():
    s = chunk_schema(DIM)
    assert s.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert s.field("latents").type == pa.binary()
    assert s.field("latents_shape").type == pa.list_(pa.int32(), 4)
    assert s.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert not s.field("chunk_index").nullable
    assert s.field("chunk_index").metadata == {b"lance-schema:unenforced-primary-key": b"true"}
    assert set(s.names) >= {"stream_id", "chunk_index", "first_frame", "num_frames", "model_hash", "checksum"}


def test_encode_decode_round_trip():
    rec = make_record("s", 3)
    enc = encode_record(rec, DIM)
    t = encoded_to_table([enc], chunk_schema(DIM))
    row = t.to_pylist()[0]
    assert row["chunk_index"] == 3 and row["first_frame"] == 6 and row["num_frames"] == 2
    np.testing.assert_array_equal(np.asarray(row["embedding"], np.float32), rec.embedding)
    lat = decode_latents(
        row["latents"], row["latents_shape"], row["latents_dtype"], row["checksum"], stream_id="s", chunk_index=3
    )
    assert torch.equal(lat, rec.latents.half().float())
    assert row["created_at"] is not None


def test_decode_rejects_corrupted_payload():
    enc = encode_record(make_record("s", 1), DIM)
    bad = bytearray(enc.latents)
    bad[5] ^= 0xFF
    with pytest.raises(ChecksumError, match=r"s\[1\].*checksum"):
        decode_latents(bytes(bad), enc.latents_shape, "float16", enc.checksum, stream_id="s", chunk_index=1)
    with pytest.raises(ChecksumError):  # right bytes, wrong shape
        decode_latents(enc.latents, (4, 2, 4, 4), "float16", enc.checksum, stream_id="s", chunk_index=1)


def test_encode_rejects_bad_input():
    rec = make_record("s", 0)
    with pytest.raises(ValueError, match=r"embedding.shape=\(16,\), the store expects \(8,\)"):
        encode_record(rec, 8)
    rec2 = make_record("s", 0)
    rec2.latents = rec2.latents[0]  # [C, H, W]
    with pytest.raises(ValueError, match=r"\[F, C, H, W\]"):
        encode_record(rec2, DIM)
    rec3 = make_record("s", 0)
    rec3.latents = rec3.latents * 1e6  # overflows float16
    with pytest.raises(ValueError, match="float16"):
        encode_record(rec3, DIM)
    rec4 = make_record("s", 0)
    rec4.num_frames = 3
    with pytest.raises(ValueError, match="num_frames"):
        encode_record(rec4, DIM)
    rec5 = make_record("s", 0)
    rec5.checksum = "0" * 32
    with pytest.raises(ChecksumError):
        encode_record(rec5, DIM)
    rec6 = make_record("s", 0)
    rec6.embedding = np.full(DIM, np.nan, np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        encode_record(rec6, DIM)


def test_config_validation_and_presets(tmp_path):
    with pytest.raises(ValueError, match="batch_size=0"):
        MemoryStoreConfig(uri=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="flush_interval_s"):
        MemoryStoreConfig(uri=str(tmp_path), flush_interval_s=0)
    with pytest.raises(ValueError, match="index_type"):
        MemoryStoreConfig(uri=str(tmp_path), index_type="HNSW_MAGIC")
    with pytest.raises(ValueError, match="preset"):
        MemoryStoreConfig.from_name("huge")
    tiny = MemoryStoreConfig.from_name("tiny", uri=str(tmp_path / "m"))
    assert tiny.embedding_dim == 64 and tiny.uri == str(tmp_path / "m")
    assert MemoryStoreConfig(uri="s3://bucket/prefix/memory").uri == "s3://bucket/prefix/memory"
    assert MemoryStoreConfig(uri="rel/memory").uri == os.path.abspath("rel/memory")
