"""The two-tier search: a bounded hot tier over the newest chunks, LanceDB over the older history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_store.db import connect, open_chunk_table
from memory_store.maintenance import maintain_table
from memory_store.retriever import Retriever
from memory_store.writer import MemoryWriter
from tests.memory_store.procs import make_embedding, make_record

N = 1200


def exact_topk(stream_id: str, lo: int, hi: int, q: np.ndarray, k: int) -> list[int]:
    idx = np.arange(lo, hi)
    embs = np.stack([make_embedding(stream_id, int(i)) for i in idx]).astype(np.float64)
    s = embs @ (q / np.linalg.norm(q))
    return idx[np.lexsort((idx, -s))][:k].tolist()


def queries(n: int) -> list[np.ndarray]:
    """Half near stored chunks (some deep in the cold part), half random."""
    g = np.random.default_rng(7)
    out = []
    for i in range(n):
        if i % 2:
            near = make_embedding("s", int(g.integers(0, N)))
            out.append((near + 0.3 * g.standard_normal(near.shape)).astype(np.float32))
        else:
            out.append(g.standard_normal(make_embedding("s", 0).shape).astype(np.float32))
    return out


@pytest.fixture
def history(make_config):
    """A stream of N chunks, published the way a generator does (observe + put), hot tier of 128 rows."""

    def build(**overrides):
        cfg = make_config(hot_tier_rows=128, **overrides)
        r = Retriever(cfg)
        with MemoryWriter(cfg) as w:
            for i in range(N):
                rec = make_record("s", i)
                r.observe(rec)
                w.put(rec)
        return cfg, r

    return build


def test_two_tier_search_is_exact_without_an_index(history):
    cfg, r = history()
    with r:
        tier = r._tiers["s"]
        assert len(tier) <= 128 and tier.floor > N - 128 - 1
        for q in queries(16):
            got = r.search("s", q, 4, before_chunk=N - 2, exclude_recent=1)
            assert [h.chunk_index for h in got] == exact_topk("s", 0, N - 3, q, 4)
            assert all(h.latents.dtype == torch.float16 for h in got)  # cached and returned as stored
        assert r.cold_searches == 16
        for h in got:  # a cold hit's payload is the stored one
            want = make_record("s", h.chunk_index).latents.to(torch.float16)
            assert torch.equal(h.latents, want)
        # a candidate range wholly inside the hot tier asks LanceDB nothing
        r.search("s", queries(1)[0], 4, before_chunk=N, start_chunk=tier.floor)
        assert r.cold_searches == 16


def test_two_tier_search_is_exact_through_an_exhaustive_vector_index(history):
    # IVF_FLAT probing every partition is exact: the merged two-tier answer is the exact top-k
    cfg, r = history(index_type="IVF_FLAT", index_threshold_rows=256, nprobes=64)
    rep = maintain_table(open_chunk_table(connect(cfg), "s", cfg.embedding_dim), "s", cfg)
    assert rep.index_built and not rep.errors
    with r:
        for q in queries(12):
            got = r.search("s", q, 5, before_chunk=N)
            assert [h.chunk_index for h in got] == exact_topk("s", 0, N, q, 5)


def test_a_warm_started_tier_splits_the_history_where_the_run_did(history):
    cfg, r = history()
    qs = queries(8)
    with r:
        floor = r._tiers["s"].floor
        want = [[h.chunk_index for h in r.search("s", q, 3, before_chunk=N - 4)] for q in qs]
    with Retriever(cfg) as fresh:
        tier = fresh.open_stream("s")  # what a resumed generator does
        assert tier.floor == floor and len(tier) <= 128
        got = [[h.chunk_index for h in fresh.search("s", q, 3, before_chunk=N - 4)] for q in qs]
    assert got == want


def test_recall_of_an_approximate_index_is_measured_not_assumed(history):
    """With a coarse index (few partitions probed) the cold part may miss; recall@k stays high and the
    hot part is always exact. This pins what the benchmark reports (bench/two_tier.py)."""
    cfg, r = history(index_type="IVF_FLAT", index_threshold_rows=256, nprobes=2, refine_factor=1)
    maintain_table(open_chunk_table(connect(cfg), "s", cfg.embedding_dim), "s", cfg)
    hits = total = 0
    with r:
        for q in queries(20):
            got = {h.chunk_index for h in r.search("s", q, 5, before_chunk=N)}
            want = set(exact_topk("s", 0, N, q, 5))
            hits += len(got & want)
            total += len(want)
            hot = [c for c in exact_topk("s", r._tiers["s"].floor, N, q, 5) if c in want]
            assert set(hot) <= got  # whatever the index misses, the hot tier's share is exact
    assert 0.3 <= hits / total <= 1.0
