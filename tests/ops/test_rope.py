import math

import pytest
import torch

from ops.positions import PositionPolicy
from ops.rope import Rope3D, apply_rope, split_rope_pairs


def test_split_rope_pairs_covers_width():
    for d in (6, 16, 48, 64, 128):
        n_t, n_h, n_w = split_rope_pairs(d)
        assert n_t + n_h + n_w == d // 2 and min(n_t, n_h, n_w) >= 1


@pytest.mark.parametrize("d", [0, 4, 7, 15])
def test_split_rope_pairs_rejects_bad_width(d):
    with pytest.raises(ValueError, match="even and >= 6"):
        split_rope_pairs(d)


def test_rope_preserves_norm_and_is_relative():
    rope = Rope3D(16)
    torch.manual_seed(0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(tq, tk):
        cq, sq = rope.cos_sin(torch.tensor([tq]), 1, 1, torch.float64)
        ck, sk = rope.cos_sin(torch.tensor([tk]), 1, 1, torch.float64)
        qr, kr = apply_rope(q[None], cq, sq)[0], apply_rope(k[None], ck, sk)[0]
        assert torch.allclose(qr.norm(), q.norm())
        return float(qr @ kr)

    # q.k depends only on the temporal distance, also a day into a stream
    base = score(7, 3)
    for shift in (10, 1_000, 1_300_000, 10**9):
        assert score(7 + shift, 3 + shift) == pytest.approx(base, rel=1e-6, abs=1e-6)


def test_angles_exact_for_huge_positions():
    rope = Rope3D(16)
    t = torch.tensor([1_296_000 * 4], dtype=torch.int64)  # > a day of latent frames
    ang = rope.temporal_angles(t)
    n_t = rope.pairs[0]
    expect = [math.fmod(float(t) * 10000.0 ** (-j / n_t), 2 * math.pi) for j in range(n_t)]
    assert torch.allclose(ang[0], torch.tensor(expect, dtype=torch.float64), atol=1e-9)


def test_spatial_axes_rotate_their_own_pairs():
    rope = Rope3D(12)  # pairs (2, 2, 2)
    cos, _ = rope.cos_sin(torch.tensor([0]), 2, 3)
    # token (h=0, w=0) has zero angle everywhere; token (h=1, w=0) only moves the height pairs
    assert torch.equal(cos[0], torch.ones(6))
    assert torch.equal(cos[3, :2], torch.ones(2)) and torch.equal(cos[3, 4:], torch.ones(2))
    assert not torch.equal(cos[3, 2:4], torch.ones(2))


def test_relative_policy_caps_newest_id_and_keeps_distances():
    pol = PositionPolicy("relative", max_temporal_id=20)
    frames = torch.arange(1_000_000, 1_000_009)
    ids = pol.temporal_ids(frames, "local", newest=1_000_008)
    assert int(ids.max()) == 20 and torch.equal(ids.diff(), torch.ones(8, dtype=torch.int64))
    assert torch.equal(pol.temporal_ids(torch.tensor([0]), "sink", newest=1_000_008), torch.tensor([0]))
    assert torch.equal(pol.temporal_ids(torch.tensor([5_000]), "memory", 1_000_008), torch.tensor([0]))
    # early in a stream relative ids equal absolute ones
    assert torch.equal(pol.temporal_ids(torch.arange(3, 6), "local", newest=5), torch.arange(3, 6))


def test_absolute_policy_is_identity():
    pol = PositionPolicy("absolute")
    frames = torch.tensor([0, 5, 1_300_000])
    assert torch.equal(pol.temporal_ids(frames, "local", newest=1_300_000), frames)


def test_policy_rejects_unknown_kind():
    with pytest.raises(ValueError, match="absolute"):
        PositionPolicy("sliding")
