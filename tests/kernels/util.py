"""Shared helpers of the kernel tests: device, random inputs, and a diff report printed on every run."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

# RMS-relative error of the output against the fp32 reference run on the same (rounded) inputs
RMS_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# max abs error of lse on rows with a valid key (lse is accumulated in fp32 in both)
LSE_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def rms_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_matches_reference(name: str, out, lse, ref_out, ref_lse, dtype: torch.dtype) -> None:
    """Compare (out, lse) with the reference; print the diff whether or not it passes."""
    out, lse = out.float().cpu(), lse.float().cpu()
    ref_out, ref_lse = ref_out.float().cpu(), ref_lse.float().cpu()
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, (out.shape, ref_out.shape)
    err = rms_rel(out, ref_out) if out.numel() else 0.0
    max_abs = float((out - ref_out).abs().max()) if out.numel() else 0.0
    finite = torch.isfinite(ref_lse)
    lse_err = float((lse[finite] - ref_lse[finite]).abs().max()) if finite.any() else 0.0
    print(
        f"{name} [{dtype}]: out rms-rel {err:.2e} (tol {RMS_TOL[dtype]:.0e}) max-abs {max_abs:.2e}; "
        f"lse max-abs {lse_err:.2e} (tol {LSE_TOL[dtype]:.0e}); {int((~finite).sum())} empty rows"
    )
    assert torch.isfinite(out).all(), "NaN/inf in the kernel output"
    assert err <= RMS_TOL[dtype], f"{name}: out rms-rel {err:.3e} > {RMS_TOL[dtype]:.0e} (max-abs {max_abs:.3e})"
    assert lse_err <= LSE_TOL[dtype], f"{name}: lse max-abs {lse_err:.3e} > {LSE_TOL[dtype]:.0e}"
    assert torch.equal(torch.isneginf(lse), ~finite), "rows with no valid key must have lse = -inf"
    assert (out[~finite] == 0).all(), "rows with no valid key must return 0"


def latent_inputs(batch, s_q, heads, d_c, d_r, s_ctx, s_new, dtype, seed=0, holes=0.0, lens=None):
    """Random queries, a context cut from cache-like rows ``[c_kv | k_rope]`` (column views, no copy)
    with NaN in every unused slot, and a chunk. Returns (args, kwargs) of the latent kernels."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q_lat, q_rope = r(batch, s_q, heads, d_c), r(batch, s_q, heads, d_r)
    rows = r(batch, s_ctx, d_c + d_r)
    valid = torch.rand(batch, s_ctx, generator=g) >= holes
    k_len = None
    if lens is not None:
        k_len = torch.tensor(lens, dtype=torch.int64)
        valid &= torch.arange(s_ctx)[None, :] < k_len[:, None]
    rows[~valid] = float("nan")
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    rows = to(rows)
    kw = dict(k_valid=valid.to(DEVICE) if holes > 0 else None, k_len=None if k_len is None else k_len.to(DEVICE))
    if s_new is not None:
        kw.update(ckv_new=to(r(batch, s_new, d_c)), k_rope_new=to(r(batch, s_new, d_r)))
    return [to(q_lat), to(q_rope), rows[..., :d_c], rows[..., d_c:]], kw


def as_fp32(args, kw):
    """The same inputs in fp32 (exact widening), for the reference."""
    f = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return [f(a) for a in args], {k: f(v) for k, v in kw.items()}
