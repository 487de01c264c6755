"""Real processes against one real LanceDB directory: concurrent writers and a writer killed mid-batch."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from memory_store.config import MemoryStoreConfig
from memory_store.db import connect, list_streams, open_chunk_table, rows_to_chunks
from memory_store.writer import MemoryWriter
from tests.memory_store.procs import DIM, append_chunks, append_forever, make_record

pytestmark = pytest.mark.slow


def all_chunk_indices(uri: str, stream_id: str) -> np.ndarray:
    """Every stored chunk index (with repeats, if any) of ``stream_id``."""
    cfg = MemoryStoreConfig(uri=uri, embedding_dim=DIM)
    table = open_chunk_table(connect(cfg), stream_id, DIM)
    return np.sort(table.search().select(["chunk_index"]).to_arrow().column("chunk_index").to_numpy())


def run_all(spawn, targets, timeout=120):
    procs = [spawn.Process(target=t, args=a) for t, a in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_four_processes_two_streams_each_500_chunks(tmp_path, spawn):
    uri = str(tmp_path / "memory")
    streams = [[f"p{p}-a", f"p{p}-b"] for p in range(4)]
    t0 = time.monotonic()
    run_all(spawn, [(append_chunks, (uri, s, 500)) for s in streams])
    elapsed = time.monotonic() - t0
    cfg = MemoryStoreConfig(uri=uri, embedding_dim=DIM)
    assert list_streams(connect(cfg)) == sorted(s for pair in streams for s in pair)
    for sid in (s for pair in streams for s in pair):
        ci = all_chunk_indices(uri, sid)
        assert len(ci) == 500 and np.array_equal(ci, np.arange(500)), sid  # each row exactly once
    print(f"4 processes x 2 streams x 500 chunks in {elapsed:.1f}s")


def test_concurrent_upserts_with_chunk_index_btree_never_duplicate(tmp_path, spawn):
    """Three writers overlap on the same chunks of one stream (a recovery racing a stale writer): the
    primary key makes the concurrent merge_inserts conflict and retry, so each chunk lands once.

    Regression: with a B-tree on chunk_index, LanceDB 0.40's index-joined merge_insert let two concurrent
    writers both insert the same chunk. The writer joins by scan; this pins that."""
    uri = str(tmp_path / "memory")
    cfg = MemoryStoreConfig(uri=uri, embedding_dim=DIM, flush_interval_s=0.01)
    with MemoryWriter(cfg) as w:
        w.put(make_record("shared", 0))
        w.maintain("shared")  # builds the chunk_index B-tree
    table = open_chunk_table(connect(cfg), "shared", DIM)
    assert any("chunk_index" in ix.columns for ix in table.list_indices())
    run_all(
        spawn,
        [
            (append_chunks, (uri, ["shared"], 200, 0, 16)),
            (append_chunks, (uri, ["shared"], 300, 100, 16)),
            (append_chunks, (uri, ["shared"], 250, 50, 16)),
        ],
    )
    assert np.array_equal(all_chunk_indices(uri, "shared"), np.arange(300))


def test_writer_killed_mid_batch_loses_only_its_uncommitted_tail(tmp_path, spawn):
    uri = str(tmp_path / "memory")
    ready = tmp_path / "ready"
    p = spawn.Process(target=append_forever, args=(uri, "victim", str(ready)))
    p.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert p.is_alive() and time.monotonic() < deadline, "writer did not start"
        time.sleep(0.02)
    time.sleep(0.4)  # let it commit more batches, then kill it in the middle of one
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL

    cfg = MemoryStoreConfig(uri=uri, embedding_dim=DIM)
    table = open_chunk_table(connect(cfg), "victim", DIM)  # the database opens
    ci = all_chunk_indices(uri, "victim")
    assert len(ci) >= 64 and np.array_equal(ci, np.arange(len(ci)))  # committed rows: a prefix, once each
    chunks = rows_to_chunks(table.to_arrow(), "victim")  # every committed payload passes its checksum
    shape = (2, 4, 16, 16)
    for c in chunks[:: max(1, len(chunks) // 50)]:
        assert torch.equal(c.latents, make_record("victim", c.chunk_index, shape=shape).latents.half().float())

    target = len(ci) + 40
    with MemoryWriter(MemoryStoreConfig(uri=uri, embedding_dim=DIM, flush_interval_s=0.01)) as w:
        durable = w.durable_chunk_index("victim")  # known, so the tail can be regenerated
        assert durable == len(ci) - 1
        for i in range(durable - 5, target):  # a recovering generator may overlap what is durable
            w.put(make_record("victim", i, shape=shape))
        w.flush()
        assert w.durable_chunk_index("victim") == target - 1
        report = w.maintain("victim")  # compaction and cleanup work on the recovered table
        assert not report.errors, report.errors
    assert np.array_equal(all_chunk_indices(uri, "victim"), np.arange(target))
