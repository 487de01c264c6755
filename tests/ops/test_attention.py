"""Reference attention: MHA against torch SDPA, the two MLA forms against each other."""

import pytest
import torch
import torch.nn.functional as F

from ops import dispatch
from ops.attention import attention_ref, latent_attention_ref, mla_absorbed_ref, mla_upprojected_ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def report(name, a, b):
    err, mx = rel_err(a, b), float((a.double() - b.double()).abs().max())
    print(f"{name}: rms-rel {err:.2e} max-abs {mx:.2e}")
    return err


@pytest.mark.parametrize("s_q,s_k,heads", [(1, 1, 1), (63, 130, 3), (5, 500, 12), (64, 63, 4)])
def test_mha_matches_sdpa(s_q, s_k, heads):
    torch.manual_seed(s_q + s_k)
    q = torch.randn(2, s_q, heads, 32)
    k, v = torch.randn(2, s_k, heads, 32), torch.randn(2, s_k, heads, 24)
    valid = torch.rand(2, s_k) > 0.3
    valid[:, 0] = True
    out, lse = attention_ref(q, k, v, valid)
    mask = valid[:, None, None, :]  # (B, 1, 1, S_k)
    expect = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    assert report("mha", out, expect.transpose(1, 2)) <= 1e-5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 32**0.5
    expect_lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1).transpose(1, 2)
    assert torch.allclose(lse, expect_lse, atol=1e-5)


def test_masked_nan_slots_never_reach_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, 6:] = False
    k[0, 6:], v[0, 6:] = float("nan"), float("nan")
    out, lse = attention_ref(q, k, v, valid)
    clean, clean_lse = attention_ref(q, k[:, :6], v[:, :6])
    assert torch.isfinite(out).all()
    assert torch.allclose(out, clean, atol=1e-6) and torch.allclose(lse, clean_lse, atol=1e-6)


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = torch.randn(1, 3, 2, 8), torch.full((1, 5, 2, 8), float("nan")), torch.full((1, 5, 2, 8), float("nan"))
    out, lse = attention_ref(q, k, v, torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def make_mla(batch, s_q, s_k, heads, d_nope=32, d_c=24, d_r=16, d_v=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (
        r(batch, s_q, heads, d_nope),
        r(batch, s_q, heads, d_r),
        r(batch, s_k, d_c),
        r(batch, s_k, d_r),
        r(heads, d_nope, d_c) * d_c**-0.5,
        r(heads, d_v, d_c) * d_c**-0.5,
    )


@pytest.mark.parametrize("s_q,s_k,heads", [(1, 1, 1), (63, 63, 3), (17, 500, 12)])
def test_mla_absorbed_equals_upprojected_fp32(s_q, s_k, heads):
    args = make_mla(2, s_q, s_k, heads, seed=s_k)
    valid = torch.rand(2, s_k, generator=torch.Generator().manual_seed(1)) > 0.2
    valid[:, -1] = True
    up, lse_up = mla_upprojected_ref(*args, k_valid=valid)
    ab, lse_ab = mla_absorbed_ref(*args, k_valid=valid)
    assert report("mla absorbed vs up-projected", ab, up) <= 1e-5
    assert torch.allclose(lse_ab, lse_up, atol=1e-5)


def test_mla_ignores_nan_in_masked_latent_slots():
    q_nope, q_rope, ckv, k_rope, w_uk, w_uv = make_mla(1, 8, 20, 3)
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, 12:] = False
    ckv[0, 12:], k_rope[0, 12:] = float("nan"), float("nan")
    for fn in (mla_upprojected_ref, mla_absorbed_ref):
        out, _ = fn(q_nope, q_rope, ckv, k_rope, w_uk, w_uv, k_valid=valid)
        assert torch.isfinite(out).all(), fn.__name__


def test_mla_rejects_mismatched_shapes():
    q_nope, q_rope, ckv, k_rope, w_uk, w_uv = make_mla(1, 4, 6, 2)
    with pytest.raises(ValueError):
        mla_absorbed_ref(q_nope, q_rope, ckv[..., :-1], k_rope, w_uk, w_uv)
    with pytest.raises(ValueError):
        latent_attention_ref(q_nope, q_rope, ckv, k_rope)  # no scale given
    with pytest.raises(ValueError, match="k_valid"):
        attention_ref(
            torch.randn(1, 2, 1, 4),
            torch.randn(1, 3, 1, 4),
            torch.randn(1, 3, 1, 4),
            torch.ones(1, 2, dtype=torch.bool),
        )


def test_dispatch_matches_reference():
    torch.manual_seed(3)
    q, k, v = torch.randn(63, 3, 16), torch.randn(130, 3, 16), torch.randn(130, 3, 16)
    ref, _ = attention_ref(q[None], k[None], v[None])
    assert report("dispatch.mha", dispatch.mha(q, k, v), ref[0]) <= 1e-5
    q_lat, q_rope, ckv, k_rope = (
        torch.randn(63, 3, 24),
        torch.randn(63, 3, 8),
        torch.randn(130, 24),
        torch.randn(130, 8),
    )
    ref, _ = latent_attention_ref(q_lat[None], q_rope[None], ckv[None], k_rope[None], scale=0.2)
    assert report("dispatch.latent", dispatch.latent(q_lat, q_rope, ckv, k_rope, 0.2), ref[0]) <= 1e-5
