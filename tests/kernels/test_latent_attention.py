"""Latent-cache attention kernel against its fp32 reference, on small awkward shapes.

Every case reads a context cut from cache-like rows ``[c_kv | k_rope]`` (column views, no copy) with
NaN in every unused slot, so a read that forgets a mask turns the output into NaN.
"""

import pytest
import torch

from kernels.latent_attention import latent_attention
from ops.attention import mla_upprojected_ref
from ops.latent_attention import latent_attention_varlen_ref
from tests.kernels.util import DEVICE, as_fp32, assert_matches_reference, latent_inputs

SCALE = 192**-0.5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name: batch, S_q, H, d_c, d_r, S_ctx, S_new, hole fraction, k_len per batch, (block_m, block_n)
CASES = {
    "len1-empty-memory": (1, 1, 1, 160, 64, 0, 1, 0.0, None, (16, 16)),
    "63q-3h-holes-len": (2, 63, 3, 160, 64, 130, 63, 0.3, [97, 130], (32, 32)),
    "500q-12h-small-ctx": (1, 500, 12, 32, 16, 63, 17, 0.1, None, (64, 64)),
    "17q-12h-ctx500-no-chunk": (1, 17, 12, 160, 64, 500, None, 0.0, [500], (64, 64)),
    "odd-widths": (3, 37, 4, 24, 8, 100, 5, 0.5, [0, 57, 100], (16, 32)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    batch, s_q, heads, d_c, d_r, s_ctx, s_new, holes, lens, (bm, bn) = CASES[case]
    args, kw = latent_inputs(batch, s_q, heads, d_c, d_r, s_ctx, s_new, dtype, seed=s_q, holes=holes, lens=lens)
    out, lse = latent_attention(*args, SCALE, **kw, block_m=bm, block_n=bn)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_args, ref_kw = as_fp32(args, kw)
    ref_out, ref_lse = latent_attention_varlen_ref(*ref_args, SCALE, **ref_kw)
    assert_matches_reference(case, out, lse, ref_out, ref_lse, dtype)


def test_default_tiles_match_reference():
    args, kw = latent_inputs(1, 70, 3, 160, 64, 200, 9, torch.bfloat16, holes=0.2)
    ref_args, ref_kw = as_fp32(args, kw)
    ref = latent_attention_varlen_ref(*ref_args, SCALE, **ref_kw)
    assert_matches_reference("default tiles", *latent_attention(*args, SCALE, **kw), *ref, torch.bfloat16)


@pytest.mark.parametrize("how", ["mask", "k_len-zero", "empty-context"])
def test_fully_masked_rows_give_zero_and_minus_inf(how):
    holes, lens, s_ctx = {"mask": (1.0, None, 40), "k_len-zero": (0.0, [0], 40), "empty-context": (0.0, None, 0)}[how]
    args, kw = latent_inputs(1, 5, 3, 160, 64, s_ctx, None, torch.float32, holes=holes, lens=lens)
    if how == "mask":
        assert not kw["k_valid"].any() and torch.isnan(args[2]).all()
    out, lse = latent_attention(*args, SCALE, **kw, block_m=16, block_n=16)
    print(f"{how}: out max-abs {out.abs().max():.1e}, lse {lse.unique().tolist()}")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_nan_past_k_len_is_never_read():
    # no k_valid: only k_len keeps the kernel away from the NaN tail of each context
    args, kw = latent_inputs(2, 9, 2, 160, 64, 90, 4, torch.float32, lens=[33, 64])
    assert torch.isnan(args[2][0, 33:]).all() and kw["k_valid"] is None
    out, lse = latent_attention(*args, SCALE, **kw, block_m=16, block_n=32)
    assert_matches_reference(
        "nan past k_len", out, lse, *latent_attention_varlen_ref(*args, SCALE, **kw), torch.float32
    )


def test_composes_into_full_mla_output():
    """W_UV applied to the kernel's o_lat equals the up-projected MLA reference (per-head K/V)."""
    g = torch.Generator().manual_seed(3)
    heads, d_nope, d_c, d_r, s_q, s_k = 3, 32, 160, 64, 20, 77
    q_nope, q_rope = torch.randn(1, s_q, heads, d_nope, generator=g), torch.randn(1, s_q, heads, d_r, generator=g)
    ckv, k_rope = torch.randn(1, s_k, d_c, generator=g), torch.randn(1, s_k, d_r, generator=g)
    w_uk = torch.randn(heads, d_nope, d_c, generator=g) * d_c**-0.5
    w_uv = torch.randn(heads, d_nope, d_c, generator=g) * d_c**-0.5
    valid = torch.rand(1, s_k, generator=g) > 0.25
    expect, expect_lse = mla_upprojected_ref(q_nope, q_rope, ckv, k_rope, w_uk, w_uv, k_valid=valid)
    q_lat = torch.einsum("bqhn,hnc->bqhc", q_nope, w_uk)  # (B, S_q, H, d_nope) -> (B, S_q, H, d_c)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    o_lat, lse = latent_attention(
        dev(q_lat),
        dev(q_rope),
        dev(ckv),
        dev(k_rope),
        (d_nope + d_r) ** -0.5,
        k_valid=dev(valid),
        block_m=32,
        block_n=16,
    )
    out = torch.einsum("bqhc,hvc->bqhv", o_lat.cpu(), w_uv)
    assert_matches_reference("kernel + W_UV vs up-projected MLA", out, lse, expect, expect_lse, torch.float32)


def _bad_calls():
    q, qr = torch.zeros(1, 4, 2, 32), torch.zeros(1, 4, 2, 16)
    c, r = torch.zeros(1, 8, 32), torch.zeros(1, 8, 16)
    yield "3-D q", (q[0], qr, c, r, SCALE), {}
    yield "d_c mismatch", (q, qr, c[..., :24], r, SCALE), {}
    yield "d_r mismatch", (q, qr, c, r[..., :8], SCALE), {}
    yield "batch mismatch", (q, qr, c.expand(2, -1, -1), r.expand(2, -1, -1), SCALE), {}
    yield "mixed dtypes", (q, qr, c.half(), r.half(), SCALE), {}
    yield "int dtype", (q.int(), qr.int(), c.int(), r.int(), SCALE), {}
    yield "no scale", (q, qr, c, r, None), {}
    yield "k_valid not bool", (q, qr, c, r, SCALE), {"k_valid": torch.ones(1, 8)}
    yield "k_valid shape", (q, qr, c, r, SCALE), {"k_valid": torch.ones(1, 9, dtype=torch.bool)}
    yield "k_len float", (q, qr, c, r, SCALE), {"k_len": torch.ones(1)}
    yield "chunk half given", (q, qr, c, r, SCALE), {"ckv_new": torch.zeros(1, 3, 32)}
    yield "chunk widths", (q, qr, c, r, SCALE), {"ckv_new": torch.zeros(1, 3, 30), "k_rope_new": torch.zeros(1, 3, 16)}
    yield "block_m not pow2", (q, qr, c, r, SCALE), {"block_m": 48}
    yield "block_n too small", (q, qr, c, r, SCALE), {"block_n": 8}


@pytest.mark.parametrize("name,args,kw", list(_bad_calls()), ids=[n for n, _, _ in _bad_calls()])
def test_bad_input_raises_value_error(name, args, kw):
    with pytest.raises(ValueError):
        latent_attention(*args, **kw)
