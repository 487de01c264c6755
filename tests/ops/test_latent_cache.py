import pytest
import torch

from ops.latent_cache import CacheLayout, LatentKVCache

T = 4  # tokens per frame


def layout(**kw):
    base = dict(
        kind="mla",
        num_layers=2,
        tokens_per_frame=T,
        sink_frames=1,
        memory_frames=2,
        window_frames=4,
        latent_dim=6,
        rope_dim=6,
    )
    base.update(kw)
    return CacheLayout(**base)


def rows_for(frames, width, layer=0):
    # row value encodes (frame, layer) so reads can be checked exactly
    return torch.cat([torch.full((T, width), 100.0 * f + layer) for f in frames])


def append(cache, frames):
    plan = cache.plan_append(frames)
    for l in range(cache.layout.num_layers):
        cache.write_slots(l, plan.slots, rows_for(frames, cache.layout.width, l))
    return cache.commit(plan)


def test_sink_then_ring_and_eviction_order():
    cache = LatentKVCache(layout())
    nbytes = cache.nbytes()
    assert append(cache, [0, 1, 2]) == []
    assert cache.frame_index.tolist() == [0, -1, -1, 1, 2, -1, -1]
    assert append(cache, [3, 4, 5]) == [1]  # ring of 4 frames: frame 1 is the oldest local frame
    assert append(cache, [6, 7, 8]) == [2, 3, 4]
    assert sorted(cache.frame_index.tolist()) == [-1, -1, 0, 5, 6, 7, 8]
    assert cache.nbytes() == nbytes  # never grows
    rows, slots = cache.read(1)
    assert rows.shape == (5 * T, 12)
    got = sorted({int(v) for v in rows[:, 0].tolist()})
    assert got == [1, 501, 601, 701, 801]  # sink frame 0 (layer 1) and the 4 newest frames


def test_unused_slots_are_nan_and_never_read():
    cache = LatentKVCache(layout())
    assert torch.isnan(cache.data).all()
    append(cache, [0, 1, 2])
    rows, _ = cache.read(0)
    assert torch.isfinite(rows).all() and rows.shape[0] == 3 * T


def test_memory_slots_assignment():
    cache = LatentKVCache(layout())
    append(cache, [0, 1, 2])
    slots = cache.assign_memory([42])
    cache.write_slots(0, slots, rows_for([42], 12))
    assert cache.slot_kind(slots[0]) == "memory" and cache.frame_index[slots[0]] == 42
    with pytest.raises(ValueError, match="memory frames do not fit"):
        cache.assign_memory([1, 2, 3])


def test_chunk_larger_than_window_is_rejected():
    cache = LatentKVCache(layout(window_frames=2, sink_frames=0))
    with pytest.raises(ValueError, match="does not fit"):
        cache.plan_append([0, 1, 2])


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("bf16", 1e-2), ("fp16", 1e-3)])
def test_storage_dtypes_round_trip(dtype, tol):
    cache = LatentKVCache(layout(dtype=dtype))
    plan = cache.plan_append([0, 1])
    x = torch.randn(2 * T, 12)
    cache.write_slots(0, plan.slots, x)
    cache.commit(plan)
    rows, _ = cache.read(0)
    assert float((rows - x).norm() / x.norm()) <= tol


@pytest.mark.parametrize("gran", ["token", "frame"])
def test_fp8_latent_round_trip(gran):
    cache = LatentKVCache(layout(dtype="fp8", fp8_scale=gran))
    plan = cache.plan_append([0, 1])
    x = torch.randn(2 * T, 12) * torch.logspace(-2, 2, 2 * T)[:, None]  # per-token ranges differ a lot
    cache.write_slots(0, plan.slots, x)
    cache.commit(plan)
    rows, _ = cache.read(0)
    err = float((rows - x).norm() / x.norm())
    print(f"fp8 {gran}: rel err {err:.3e}")
    assert err < 0.08


def test_bytes_per_token_mha_vs_mla():
    mha = CacheLayout("mha", 30, 1560, num_heads=12, head_dim=128, dtype="bf16")
    mla = CacheLayout("mla", 30, 1560, latent_dim=160, rope_dim=64, dtype="bf16")
    fp8 = CacheLayout("mla", 30, 1560, latent_dim=160, rope_dim=64, dtype="fp8")
    assert mha.bytes_per_token_per_layer() == 2 * 1536 * 2
    assert mla.bytes_per_token_per_layer() == 224 * 2
    assert fp8.bytes_per_token_per_layer() == 224 + 8
    assert 1 - mla.bytes_per_token() / mha.bytes_per_token() >= 0.927
    assert 1 - fp8.bytes_per_token() / mha.bytes_per_token() >= 0.96
    assert mha.bytes_per_token() * 1560 == pytest.approx(287.5e6, rel=1e-3)  # DESIGN.md: 287.5 MB per frame


def test_capacity_bytes_equals_allocation():
    for kw in (
        dict(),
        dict(dtype="fp8"),
        dict(dtype="fp8", fp8_scale="frame"),
        dict(kind="mha", num_heads=3, head_dim=2),
    ):
        lay = layout(**kw)
        assert LatentKVCache(lay).nbytes() == lay.capacity_bytes()


def test_state_round_trip_is_exact():
    cache = LatentKVCache(layout(dtype="fp8"))
    append(cache, [0, 1, 2])
    append(cache, [3, 4, 5])
    again = LatentKVCache.from_state(cache.state_tensors(), cache.state_meta())
    assert again.window_written == cache.window_written
    assert torch.equal(again.read(1)[0], cache.read(1)[0])
    assert again.plan_append([6, 7, 8]).slots == cache.plan_append([6, 7, 8]).slots


def test_layout_validation():
    with pytest.raises(ValueError, match="kind"):
        layout(kind="gqa")
    with pytest.raises(ValueError, match="latent_dim"):
        layout(latent_dim=0)
    with pytest.raises(ValueError, match="window_frames"):
        layout(window_frames=0)
