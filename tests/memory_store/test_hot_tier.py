from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_store.db import StoredChunk
from memory_store.hot_tier import HotTier, PayloadCache, _delta, _quantize, int8_kernel_ok, payload_nbytes


def brute_force(emb: np.ndarray, chunks: np.ndarray, q: np.ndarray, k: int, lo: int, hi: int, exclude=()):
    """Reference: exact cosine top-k in float64 numpy."""
    e = emb.astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    s = e @ (q.astype(np.float64) / np.linalg.norm(q))
    ok = (chunks >= lo) & (chunks < hi) & ~np.isin(chunks, list(exclude))
    idx = np.nonzero(ok)[0]
    order = idx[np.lexsort((chunks[idx], -s[idx]))][:k]
    return chunks[order], s[order]


def assert_same_topk(hits, ref_chunks, ref_scores, tol=1e-5):
    """Equal up to ties: identical scores within tol, and the same chunks where scores are separated."""
    assert len(hits) == len(ref_chunks)
    np.testing.assert_allclose(hits.scores, ref_scores, atol=tol)
    sep = np.ones(len(ref_scores), bool)
    if len(ref_scores) > 1:
        gaps = np.abs(np.diff(ref_scores)) > 2 * tol
        sep[:-1] &= gaps
        sep[1:] &= gaps
    np.testing.assert_array_equal(hits.chunk_indices[sep], ref_chunks[sep])


@pytest.mark.parametrize("n", [1, 63, 500, 5000])
@pytest.mark.parametrize("quantize_min_rows", [1, 10**9])  # int8 two-stage path / float32 path
def test_topk_matches_brute_force(n, quantize_min_rows):
    rng = np.random.default_rng(n)
    dim = 32
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    chunks = np.arange(n)
    tier = HotTier(dim, capacity_hint=16, quantize_min_rows=quantize_min_rows)  # forces several doublings
    for i in range(0, n, 97):
        tier.extend(chunks[i : i + 97], emb[i : i + 97])
    assert len(tier) == n and tier.max_chunk_index == n - 1
    for trial in range(12):
        q = (
            emb[rng.integers(n)] + 0.1 * rng.standard_normal(dim).astype(np.float32)
            if trial % 2
            else (rng.standard_normal(dim).astype(np.float32))
        )
        hi = int(rng.integers(1, n + 1))
        lo = int(rng.integers(0, hi))
        ex = set(rng.integers(0, n, 3).tolist())
        for k in (1, 6, n + 3):
            hits = tier.topk(q, k, hi, min_chunk_index=lo, exclude=ex)
            ref_c, ref_s = brute_force(emb, chunks, q, k, lo, hi, ex)
            assert_same_topk(hits, ref_c, ref_s)


def test_int8_path_at_scale_is_exact():
    if not int8_kernel_ok(64):
        pytest.skip("int8 kernel unavailable on this machine: the float32 path is used")
    rng = np.random.default_rng(0)
    n, dim = 120_000, 64
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb[:5000] = emb[0] + 0.01 * rng.standard_normal((5000, dim)).astype(np.float32)  # a cluster of near-ties
    tier = HotTier(dim, capacity_hint=n, max_rows=n, quantize_min_rows=1)
    tier.extend(np.arange(n), emb)
    for trial in range(10):
        q = emb[int(rng.integers(n))] if trial < 5 else rng.standard_normal(dim).astype(np.float32)
        hits = tier.topk(q, 6, n - 10, exclude={1, 2, 3})
        ref_c, ref_s = brute_force(emb, np.arange(n), q, 6, 0, n - 10, {1, 2, 3})
        assert_same_topk(hits, ref_c, ref_s)


def test_int8_error_bound_holds():
    if not int8_kernel_ok(64):
        pytest.skip("int8 kernel unavailable")
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(20000, 64, generator=g), dim=1)
    x[:100] = torch.nn.functional.normalize(torch.sign(x[:100]), dim=1)  # flat rows: the worst case for int8
    q8, scale = _quantize(x)
    worst = 0.0
    for _ in range(20):
        q = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
        approx = torch._weight_int8pack_mm(q.to(torch.bfloat16)[None], q8, scale)[0].float()
        err = float((approx - x @ q).abs().max())
        bound = _delta(q, float(scale.float().max()), 64)
        worst = max(worst, err / bound)
        assert err <= bound
    print(f"largest observed error / bound = {worst:.3f}")


def test_unsorted_appends_replacements_and_duplicates():
    rng = np.random.default_rng(3)
    dim = 16
    tier = HotTier(dim, quantize_min_rows=1)
    store = {}
    for c in rng.permutation(300):
        v = rng.standard_normal(dim).astype(np.float32)
        tier.append(int(c), v)
        store[int(c)] = v
    for c in (5, 17, 250):  # regenerated chunks replace their rows
        v = rng.standard_normal(dim).astype(np.float32)
        tier.append(c, v)
        store[c] = v
    v1, v2 = rng.standard_normal((2, dim)).astype(np.float32)
    tier.extend([400, 400], np.stack([v1, v2]))  # repeated index inside one call: the last row wins
    store[400] = v2
    assert len(tier) == 301
    chunks = np.array(sorted(store))
    emb = np.stack([store[c] for c in chunks])
    for _ in range(10):
        q = rng.standard_normal(dim).astype(np.float32)
        hits = tier.topk(q, 5, 350, min_chunk_index=10, exclude=[11, 12])
        assert_same_topk(hits, *brute_force(emb, chunks, q, 5, 10, 350, [11, 12]))
    assert tier.topk(v2, 1, 401).chunk_indices.tolist() == [400]


def test_empty_and_degenerate_ranges():
    tier = HotTier(8)
    q = np.ones(8, np.float32)
    assert len(tier.topk(q, 5, 100)) == 0  # empty history
    tier.extend(np.arange(10), np.eye(8, dtype=np.float32)[np.arange(10) % 8])
    assert len(tier.topk(q, 5, 0)) == 0  # nothing before chunk 0
    assert len(tier.topk(q, 5, 5, min_chunk_index=5)) == 0
    assert len(tier.topk(q, 0, 10)) == 0
    assert len(tier.topk(q, 5, 3, exclude=[0, 1, 2])) == 0  # everything excluded
    assert tier.topk(q, 50, 10).chunk_indices.tolist() == list(range(10))  # k > candidates; ties by index
    with pytest.raises(ValueError, match="query.shape"):
        tier.topk(np.ones(7, np.float32), 1, 10)
    with pytest.raises(ValueError, match="finite"):
        tier.topk(np.full(8, np.nan, np.float32), 1, 10)
    with pytest.raises(ValueError, match="embeddings.shape"):
        tier.append(11, np.ones(9, np.float32))
    with pytest.raises(ValueError, match="chunk indices"):
        tier.append(-1, np.ones(8, np.float32))
    with pytest.raises(ValueError, match="chunk indices"):
        tier.append(2**40, np.ones(8, np.float32))  # would need a huge chunk -> row table


def test_prefetch_returns_the_same_result():
    rng = np.random.default_rng(5)
    tier = HotTier(32, quantize_min_rows=1)
    tier.extend(np.arange(2000), rng.standard_normal((2000, 32)).astype(np.float32))
    q = rng.standard_normal(32).astype(np.float32)
    fut = tier.prefetch(q, 6, 1500, exclude=[3])
    tier.extend(np.arange(2000, 2100), rng.standard_normal((100, 32)).astype(np.float32))  # appends meanwhile
    got, want = fut.result(timeout=10), tier.topk(q, 6, 1500, exclude=[3])
    np.testing.assert_array_equal(got.chunk_indices, want.chunk_indices)
    tier.close()


def _payload(nbytes: int):
    return StoredChunk(0, 0, 1, torch.zeros(nbytes // 2, dtype=torch.float16))


def test_payload_cache_is_lru():
    a, b, c3 = _payload(1000), _payload(1000), _payload(1000)
    c = PayloadCache(2 * payload_nbytes(a))
    c.put(1, a)
    c.put(2, b)
    assert c.get(1) is a
    c.put(3, c3)  # evicts 2, the least recently used
    assert c.get(2) is None and c.get(1) is a and c.get(3) is c3
    assert (c.hits, c.misses) == (3, 1)


def test_payload_cache_holds_its_byte_budget_over_many_puts():
    one = payload_nbytes(_payload(6000))
    c = PayloadCache(10 * one + one // 2)
    for i in range(5000):
        c.put(i, _payload(6000))
        assert c.nbytes <= c.capacity_bytes
    assert len(c) == 10 and c.nbytes == 10 * one and c.evictions == 4990
    assert c.get(4999) is not None and c.get(4989) is None
    c.put(-1, _payload(20 * one))  # larger than the budget: not cached, nothing evicted
    assert c.peek(-1) is None and len(c) == 10
    off = PayloadCache(0)
    off.put(1, _payload(10))
    assert len(off) == 0


def test_tier_is_bounded_and_its_floor_follows_the_rule():
    rng = np.random.default_rng(3)
    dim, max_rows = 16, 256
    tier = HotTier(dim, capacity_hint=16, max_rows=max_rows, quantize_min_rows=10**9)
    emb = rng.standard_normal((5000, dim)).astype(np.float32)
    sizes = set()
    for i in range(5000):
        tier.append(i, emb[i])
        sizes.add(tier.nbytes)
        assert len(tier) <= max_rows
        block = max_rows // 16
        want = 0 if i + 1 <= max_rows else block * -(-(i + 1 - max_rows) // block)
        assert tier.floor == want
    assert max(sizes) <= max_rows * HotTier.row_bytes(dim)  # the arrays stopped growing
    # exact top-k over what it holds: chunks in [floor, 5000)
    q = emb[4000]
    hits = tier.topk(q, 5, 5000)
    ref_c, ref_s = brute_force(emb, np.arange(5000), q, 5, tier.floor, 5000)
    assert_same_topk(hits, ref_c, ref_s)
    # a bulk load of the same history lands on the same floor (a warm start splits where the run did)
    bulk = HotTier(dim, max_rows=max_rows, quantize_min_rows=10**9)
    bulk.extend(np.arange(5000), emb)
    assert bulk.floor == tier.floor and len(bulk) == len(tier)
    np.testing.assert_array_equal(bulk.topk(q, 5, 5000).chunk_indices, hits.chunk_indices)
    bulk.extend(np.arange(10), emb[:10])  # below the floor: ignored
    assert len(bulk) == len(tier)
