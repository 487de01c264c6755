from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from memory_store.db import connect, open_chunk_table, read_chunk_indices
from memory_store.schema import MemoryStoreError, UnknownStreamError
from memory_store.writer import MemoryWriter
from tests.memory_store.procs import DIM, make_record


def read_rows(config, stream_id):
    table = open_chunk_table(connect(config), stream_id, config.embedding_dim)
    return sorted(table.to_arrow().to_pylist(), key=lambda r: r["chunk_index"])


def test_round_trip_every_field(make_config):
    cfg = make_config()
    recs = [make_record("cam-1", i) for i in range(40)]
    with MemoryWriter(cfg) as w:
        for r in recs:
            w.put(r)
        w.flush()
        assert w.durable_chunk_index("cam-1") == 39
    rows = read_rows(cfg, "cam-1")
    assert [r["chunk_index"] for r in rows] == list(range(40))
    for rec, row in zip(recs, rows):
        assert row["stream_id"] == "cam-1"
        assert row["first_frame"] == rec.first_frame and row["num_frames"] == rec.num_frames
        np.testing.assert_array_equal(np.asarray(row["embedding"], np.float32), rec.embedding)
        assert row["latents_shape"] == list(rec.latents.shape)
        stored = torch.from_numpy(np.frombuffer(row["latents"], np.float16).reshape(row["latents_shape"]).copy())
        assert torch.equal(stored, rec.latents.half())
        assert row["model_hash"] == "m0" and len(row["checksum"]) == 32 and row["created_at"] is not None


def test_batches_commits_instead_of_one_per_chunk(make_config):
    cfg = make_config(batch_size=50, flush_interval_s=5.0)
    with MemoryWriter(cfg) as w:
        for i in range(200):
            w.put(make_record("s", i))
        w.flush()
        assert w.stats.chunks_committed == 200
        assert w.stats.commits <= 5, w.stats  # 4 full batches (+ at most one flushed remainder)


def test_idempotent_by_chunk_index(make_config):
    cfg = make_config()
    with MemoryWriter(cfg) as w:
        for i in range(20):
            w.put(make_record("s", i))
        w.put(make_record("s", 7))  # duplicate inside one batch
        w.flush()
        for i in range(5, 15):  # regenerated after a "recovery", in later batches
            w.put(make_record("s", i, salt="regen"))
        w.flush()
        for i in range(5, 15):
            w.put(make_record("s", i, salt="regen"))
        w.flush()
    rows = read_rows(cfg, "s")
    assert [r["chunk_index"] for r in rows] == list(range(20))  # each exactly once
    regen = make_record("s", 9, salt="regen").latents.half()
    stored = np.frombuffer(rows[9]["latents"], np.float16).reshape(rows[9]["latents_shape"])
    assert torch.equal(torch.from_numpy(stored.copy()), regen)  # the regenerated copy replaced the old one


def test_streams_get_their_own_tables(make_config):
    cfg = make_config()
    with MemoryWriter(cfg) as w:
        for i in range(10):
            w.put(make_record("a", i))
            w.put(make_record("b", 100 + i))
    from memory_store.db import list_streams

    assert list_streams(connect(cfg)) == ["a", "b"]
    assert [r["chunk_index"] for r in read_rows(cfg, "b")] == list(range(100, 110))


def test_table_version_and_durable_index(make_config):
    cfg = make_config()
    with MemoryWriter(cfg) as w:
        assert w.durable_chunk_index("fresh") == -1
        v0 = w.table_version("fresh")  # creates the empty table
        for i in range(5):
            w.put(make_record("fresh", i))
        w.flush()
        v1 = w.table_version("fresh")
        assert v1 > v0
        w.put(make_record("fresh", 7))  # a gap: 5 and 6 missing
        w.flush()
        assert w.durable_chunk_index("fresh") == 4


def test_bad_input_is_rejected_at_put(make_config):
    cfg = make_config()
    with MemoryWriter(cfg) as w:
        rec = make_record("s", 0, dim=DIM + 1)
        with pytest.raises(ValueError, match="embedding.shape"):
            w.put(rec)
        rec = make_record("s", 0)
        rec.stream_id = "Bad Id"
        with pytest.raises(ValueError, match="must match"):
            w.put(rec)
        w.put(make_record("s", 0))  # the writer is still usable
        w.flush()
        assert w.durable_chunk_index("s") == 0


def test_embedding_size_mismatch_with_existing_table_surfaces(make_config):
    with MemoryWriter(make_config()) as w:
        w.put(make_record("s", 0))
    w = MemoryWriter(make_config(embedding_dim=8))
    w.put(make_record("s", 1, dim=8))
    with pytest.raises(MemoryStoreError, match="stored embedding size is 16"):
        w.flush(timeout=10)
    with pytest.raises(MemoryStoreError):
        w.put(make_record("s", 2, dim=8))
    with pytest.raises(MemoryStoreError):
        w.close()


def test_background_error_surfaces_on_next_call(make_config, monkeypatch):
    def broken(self, stream_id, rows):
        raise OSError("disk on fire")

    monkeypatch.setattr(MemoryWriter, "_commit_stream", broken)
    w = MemoryWriter(make_config())
    w.put(make_record("s", 0))
    with pytest.raises(MemoryStoreError, match="disk on fire") as e:
        w.flush(timeout=10)
    assert isinstance(e.value.__cause__, OSError)
    with pytest.raises(MemoryStoreError, match="disk on fire"):
        w.put(make_record("s", 1))
    with pytest.raises(MemoryStoreError):
        w.close()


def test_transient_commit_errors_are_retried(make_config, monkeypatch):
    calls = {"n": 0}
    orig_open = open_chunk_table

    def flaky_open(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("object store hiccup")
        return orig_open(*args, **kwargs)

    monkeypatch.setattr("memory_store.writer.open_chunk_table", flaky_open)
    with MemoryWriter(make_config(commit_retries=3)) as w:
        w.put(make_record("s", 0))
        w.flush(timeout=10)
        assert w.stats.commit_retries == 2


def test_backpressure_blocks_put_when_queue_full(make_config, monkeypatch):
    release = threading.Event()
    real = MemoryWriter._commit_stream

    def slow(self, stream_id, rows):  # storage that stalls until released
        release.wait(10)
        real(self, stream_id, rows)

    monkeypatch.setattr(MemoryWriter, "_commit_stream", slow)
    cfg = make_config(queue_max=4, batch_size=2, flush_interval_s=0.01)
    w = MemoryWriter(cfg)
    put = 0
    with pytest.raises(TimeoutError, match="queue full"):
        for i in range(100):
            w.put(make_record("s", i), timeout=0.2)
            put += 1
    assert put <= cfg.queue_max + cfg.batch_size  # bounded: queue + the batch being committed
    t0 = time.monotonic()
    threading.Timer(0.3, release.set).start()
    w.put(make_record("s", put))  # blocks until the commit thread drains
    assert time.monotonic() - t0 >= 0.2
    w.close()
    assert w.durable_chunk_index("s") == put


def test_flush_waits_for_everything_put_before(make_config):
    cfg = make_config(batch_size=1000, flush_interval_s=30.0)  # would wait 30 s without the flush request
    with MemoryWriter(cfg) as w:
        for i in range(10):
            w.put(make_record("s", i))
        t0 = time.monotonic()
        w.flush(timeout=10)
        assert time.monotonic() - t0 < 5
        assert w.durable_chunk_index("s") == 9


def test_closed_writer_refuses_puts(make_config):
    w = MemoryWriter(make_config())
    w.close()
    w.close()  # idempotent
    with pytest.raises(MemoryStoreError, match="closed"):
        w.put(make_record("s", 0))


def test_unknown_stream_on_read(make_config):
    with pytest.raises(UnknownStreamError, match="nope"):
        open_chunk_table(connect(make_config()), "nope", DIM)


def test_concurrent_threads_share_one_writer(make_config):
    cfg = make_config()
    with MemoryWriter(cfg) as w:
        threads = [threading.Thread(target=lambda s=s: [w.put(make_record(s, i)) for i in range(100)]) for s in "abc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.flush()
        for s in "abc":
            table = open_chunk_table(connect(cfg), s, DIM)
            assert np.array_equal(read_chunk_indices(table), np.arange(100))
            assert table.count_rows() == 100
