from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_store.db import StoredChunk, connect, open_chunk_table
from memory_store.hot_tier import HotTier, payload_nbytes
from memory_store.retriever import Retriever, adaptive_window_exclusion, longlive_rag_candidates
from memory_store.schema import ChecksumError, MemoryStoreError, UnknownStreamError
from memory_store.writer import MemoryWriter
from tests.memory_store.procs import DIM, make_embedding, make_record


def write(cfg, stream_id, indices):
    with MemoryWriter(cfg) as w:
        for i in indices:
            w.put(make_record(stream_id, i))


def brute_force(stream_id, indices, q, k):
    embs = np.stack([make_embedding(stream_id, i) for i in indices]).astype(np.float64)
    s = embs @ (q / np.linalg.norm(q))
    order = np.lexsort((np.asarray(indices), -s))[:k]
    return [indices[i] for i in order], s[order]


@pytest.mark.parametrize("hot", [True, False])
def test_search_returns_exact_topk_with_payloads(make_config, hot):
    cfg = make_config(hot_tier=hot)
    write(cfg, "s", range(300))
    q = make_embedding("s", 250) + 0.3 * make_embedding("s", 40)
    with Retriever(cfg) as r:
        got = r.search("s", q, 6, before_chunk=200, exclude_recent=10)
    want, scores = brute_force("s", list(range(190)), q, 6)
    assert [c.chunk_index for c in got] == want
    np.testing.assert_allclose([c.score for c in got], scores, atol=1e-5)
    for c in got:
        rec = make_record("s", c.chunk_index)
        assert torch.equal(c.latents, rec.latents.half().float())
        assert (c.first_frame, c.num_frames) == (rec.first_frame, rec.num_frames)


def test_candidates_respect_window_and_recent_exclusion(make_config):
    cfg = make_config()
    write(cfg, "s", range(100))
    with Retriever(cfg) as r:
        q = make_embedding("s", 95)  # the best match is inside the window: never returned
        got = r.search("s", q, 100, before_chunk=90, exclude_recent=5)
        assert sorted(c.chunk_index for c in got) == list(range(85))
        got = r.search("s", q, 100, before_chunk=90, start_chunk=10)
        assert sorted(c.chunk_index for c in got) == list(range(10, 90))
        assert r.search("s", q, 6, before_chunk=3, exclude_recent=5) == []  # R larger than the history
        assert r.search("s", q, 0, before_chunk=90) == []


def test_hot_and_cold_paths_agree(make_config):
    write(make_config(), "s", range(200))
    q = make_embedding("s", 7)
    with Retriever(make_config()) as hot, Retriever(make_config(hot_tier=False)) as cold:
        a = hot.search("s", q, 8, before_chunk=150)
        b = cold.search("s", q, 8, before_chunk=150)
    assert [c.chunk_index for c in a] == [c.chunk_index for c in b]
    assert a[0].chunk_index == 7 and a[0].score == pytest.approx(1.0, abs=1e-5)


def test_version_pinning_hides_later_rows(make_config):
    """Checkpoint style: write, record the version, write more; a pinned search never sees the rest."""
    cfg = make_config()
    with MemoryWriter(cfg) as w:
        for i in range(50):
            w.put(make_record("s", i))
        v = w.pin_version("s", "ckpt-49")
        for i in range(50, 100):
            w.put(make_record("s", i))
    q = make_embedding("s", 75)
    for hot in (True, False):
        with Retriever(make_config(hot_tier=hot)) as r:
            latest = r.search("s", q, 3, before_chunk=100)
            assert latest[0].chunk_index == 75
            pinned = r.search("s", q, 100, before_chunk=100, version=v)
            assert sorted(c.chunk_index for c in pinned) == list(range(50))
    tier = HotTier.from_lancedb(cfg, "s", version=v)
    assert len(tier) == 50 and tier.max_chunk_index == 49 and tier.version == v


def test_resumed_stream_retrieves_what_the_original_run_did(make_config):
    """Original run: observe every chunk, retrieve each step. Resumed run: warm start at the checkpoint
    version, regenerate the tail: the retrievals are identical."""
    cfg = make_config()
    window, rr, k = 8, 2, 4

    def step_queries(i):
        return make_embedding("s", i - 1)

    original = {}
    with MemoryWriter(cfg) as w, Retriever(cfg) as r:
        for i in range(60):
            got = r.search("s", step_queries(i), k, before_chunk=max(0, i - window), exclude_recent=rr)
            original[i] = [(c.chunk_index, c.score) for c in got]
            rec = make_record("s", i)
            w.put(rec)
            r.observe(rec)
            if i == 39:
                ckpt_version = w.pin_version("s", "ckpt-39")
    resumed = {}
    with MemoryWriter(cfg) as w, Retriever(cfg) as r:
        r.open_stream("s", version=ckpt_version)
        for i in range(40, 60):  # chunks 40..59 are already durable, but invisible at the pinned version
            got = r.search(
                "s", step_queries(i), k, before_chunk=max(0, i - window), exclude_recent=rr, version=ckpt_version
            )
            resumed[i] = [(c.chunk_index, c.score) for c in got]
            rec = make_record("s", i)
            w.put(rec)
            r.observe(rec)
    assert all(resumed[i] == original[i] for i in range(40, 60))
    assert any(len(resumed[i]) == k for i in range(40, 60))


def test_a_payload_not_yet_durable_survives_eviction_from_a_small_lru(make_config):
    # the LRU holds 2 payloads; the writer commits only on flush: without the pending hold chunk 0 is in
    # the hot tier but neither cached nor in the store
    rec = make_record("p", 0)
    one = payload_nbytes(StoredChunk(0, 0, rec.num_frames, rec.latents.half()))
    cfg = make_config(payload_cache_bytes=2 * one, batch_size=1000, flush_interval_s=600.0)
    with MemoryWriter(cfg) as w, Retriever(cfg) as r:
        r.attach_writer(w)
        for i in range(12):
            rec = make_record("p", i)
            w.put(rec)
            r.observe(rec)
        assert r.memory_bytes()["pending_payloads"] == 12 * (one + 4 * DIM)  # payload + float32 embedding
        got = r.search("p", make_embedding("p", 0), 1, before_chunk=4)
        assert got[0].chunk_index == 0
        assert torch.equal(got[0].latents, make_record("p", 0).latents.half())
        w.flush()  # committed: the hold is let go, the store serves what the LRU dropped
        assert r.memory_bytes()["pending_payloads"] == 0
        got = r.search("p", make_embedding("p", 1), 1, before_chunk=4)
        assert got[0].chunk_index == 1
        assert torch.equal(got[0].latents, make_record("p", 1).latents.half())


def test_a_chunk_the_hot_tier_evicts_before_it_is_durable_is_still_found(make_config):
    # regression: the tier holds 4 rows, the writer commits only on flush; the evicted chunks were in
    # neither tier (a different retrieval), or the cold search failed for want of a table
    cfg = make_config(hot_tier_rows=4, batch_size=1000, flush_interval_s=600.0)
    with MemoryWriter(cfg) as w, Retriever(cfg) as r:
        r.attach_writer(w)
        for i in range(12):
            rec = make_record("e", i)
            w.put(rec)
            r.observe(rec)
        q = make_embedding("e", 2) + 0.2 * make_embedding("e", 9)
        want, _ = brute_force("e", list(range(12)), q, 3)
        before = r.search("e", q, 3, before_chunk=12)
        assert r._tiers["e"].floor > want[0] and r.cold_searches == 1  # the best hit is below the tier
        assert [c.chunk_index for c in before] == want
        w.flush()  # now durable: LanceDB serves them, with the same choices
        after = r.search("e", q, 3, before_chunk=12)
        assert [c.chunk_index for c in after] == want
        np.testing.assert_allclose([c.score for c in after], [c.score for c in before], atol=1e-5)
        assert torch.equal(after[0].latents, make_record("e", want[0]).latents.half())


def test_observed_chunks_are_searchable_before_they_are_durable(make_config):
    cfg = make_config()
    with Retriever(cfg) as r:
        for i in range(30):
            r.observe(make_record("new", i))  # nothing written to the store at all
        got = r.search("new", make_embedding("new", 3), 2, before_chunk=20)
        assert got[0].chunk_index == 3
        assert torch.equal(got[0].latents, make_record("new", 3).latents.half().float())


def test_latest_tier_catches_up_with_other_writers(make_config):
    cfg = make_config()
    write(cfg, "s", range(20))
    with Retriever(cfg) as r:
        assert r.search("s", make_embedding("s", 5), 1, before_chunk=20)[0].chunk_index == 5
        write(cfg, "s", range(20, 40))  # another process's writer
        assert r.search("s", make_embedding("s", 33), 1, before_chunk=40)[0].chunk_index == 33


def test_bad_input_errors(make_config):
    cfg = make_config()
    write(cfg, "s", range(10))
    with Retriever(cfg) as r:
        with pytest.raises(UnknownStreamError, match="unknown stream 'ghost'"):
            r.search("ghost", make_embedding("s", 1), 3, before_chunk=10)
        with pytest.raises(ValueError, match=r"query.shape=\(15,\) must be \(16,\)"):
            r.search("s", np.ones(DIM - 1, np.float32), 3, before_chunk=10)
        with pytest.raises(ValueError, match="must match"):
            r.search("S!", make_embedding("s", 1), 3, before_chunk=10)
        with pytest.raises(MemoryStoreError, match="version 999"):
            r.search("s", make_embedding("s", 1), 3, before_chunk=10, version=999)
    with Retriever(make_config(embedding_dim=8)) as r, pytest.raises(ValueError, match="embedding size is 16"):
        r.search("s", np.ones(8, np.float32), 3, before_chunk=10)


@pytest.mark.parametrize("hot", [True, False])
def test_corrupted_payload_raises_checksum_error(make_config, hot):
    cfg = make_config(hot_tier=hot)
    write(cfg, "s", range(10))
    table = open_chunk_table(connect(cfg), "s", DIM)
    table.update(where="chunk_index = 4", values={"checksum": "0" * 32})
    with Retriever(cfg) as r, pytest.raises(ChecksumError, match=r"s\[4\].*checksum"):
        r.search("s", make_embedding("s", 4), 1, before_chunk=10)


def test_prefetch_matches_search(make_config):
    cfg = make_config()
    write(cfg, "s", range(50))
    with Retriever(cfg) as r:
        q = make_embedding("s", 12)
        fut = r.prefetch("s", q, 3, before_chunk=40, exclude_recent=2)
        want = r.search("s", q, 3, before_chunk=40, exclude_recent=2)
        got = fut.result(timeout=30)
    assert [c.chunk_index for c in got] == [c.chunk_index for c in want]


# ---------------------------------------------------------------- policies


def test_longlive_rag_candidates():
    # 20 chunks generated, window of 4, R = 3, sink of 1: evicted are 1..15, minus 13..15
    c = longlive_rag_candidates(next_chunk=20, window_chunks=4, recent_exclude=3, sink_chunks=1)
    assert (c.start, c.stop, len(c)) == (1, 13, 12)
    assert 1 in c and 12 in c and 13 not in c and 0 not in c
    assert len(longlive_rag_candidates(0, 4, 3)) == 0  # empty history
    assert len(longlive_rag_candidates(3, 4, 0)) == 0  # history shorter than the window
    assert len(longlive_rag_candidates(6, 4, 5)) == 0  # R larger than the evicted set
    assert len(longlive_rag_candidates(10, 4, 5, sink_chunks=2)) == 0
    assert len(longlive_rag_candidates(10, 0, 0)) == 10  # no window: everything
    assert len(longlive_rag_candidates(np.int64(20), 4, 3)) == 13  # numpy integers are fine
    with pytest.raises(ValueError, match="recent_exclude=-1"):
        longlive_rag_candidates(10, 4, -1)


def test_adaptive_window_exclusion():
    c = adaptive_window_exclusion(next_chunk=20, window_chunks=4, sink_chunks=1)
    assert (c.start, c.stop) == (1, 16)  # enough long-range history: window and sink left out
    c = adaptive_window_exclusion(next_chunk=5, window_chunks=4, sink_chunks=1)
    assert (c.start, c.stop) == (0, 5)  # history shorter than sink + window: everything is a candidate
    c = adaptive_window_exclusion(next_chunk=10, window_chunks=4, min_long_range=8)
    assert (c.start, c.stop) == (0, 10)  # 6 long-range chunks < 8 wanted
    assert len(adaptive_window_exclusion(0, 4)) == 0  # empty history
    with pytest.raises(ValueError, match="min_long_range"):
        adaptive_window_exclusion(10, 4, min_long_range=0)


def test_policy_ranges_drive_search(make_config):
    cfg = make_config()
    write(cfg, "s", range(40))
    with Retriever(cfg) as r:
        rng = longlive_rag_candidates(next_chunk=40, window_chunks=6, recent_exclude=4, sink_chunks=1)
        got = r.search_range("s", make_embedding("s", 38), 50, rng)
        assert sorted(c.chunk_index for c in got) == list(range(1, 30))


def test_payload_miss_reads_ahead_into_the_lru(make_config):
    cfg = make_config(payload_readahead=4)
    write(cfg, "s", range(100))
    with Retriever(cfg) as r:
        q = make_embedding("s", 30)
        got = r.search("s", q, 3, before_chunk=100)
        tier = r._tiers["s"]
        assert len(tier.payloads) == 3 + 4  # the 3 hits and the next 4 ranked
        ranked = tier.topk(q, 7, 100).chunk_indices.tolist()
        assert [c.chunk_index for c in got] == ranked[:3]
        assert all(tier.payloads.peek(c) is not None for c in ranked)
        misses = tier.payloads.misses
        r.search("s", q, 7, before_chunk=100)  # everything cached: no store read, no new miss
        assert tier.payloads.misses == misses
