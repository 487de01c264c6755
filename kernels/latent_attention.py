"""Absorbed-MLA attention of a chunk of queries over the latent cache, in one Triton kernel.

Every head shares the keys ``[c_kv | k_rope]`` (d_c + d_r) and the values ``c_kv`` (d_c), so this is
multi-query attention in latent space: the (query, head) pairs are folded into the row axis of a
tile (row r = s * H + h) and one key tile read from memory serves every head. No per-head K/V of the
context is ever written to GPU memory; the only pass over the cache is this kernel's.

Keys come from two ranges, so the caller never concatenates the cache with the chunk:
    context: ``ckv [B, S_ctx, d_c]``, ``k_rope [B, S_ctx, d_r]``, keys ``j < k_len[b]`` with ``k_valid``;
    chunk:   ``ckv_new [B, S_new, d_c]``, ``k_rope_new [B, S_new, d_r]``, all valid (optional).
Context tiles past ``k_len`` are never read; masked slots inside are never loaded (they may hold NaN).

d_c = 160 is not a power of two. The latent dot is split into two power-of-two column blocks
(``BLOCK_C1 + BLOCK_C2`` = 128 + 32 for d_c = 160) rather than padded to 256, so no MMA work is spent
on padding at our shapes; the rope part is its own dot (d_r = 64). The key tile is loaded once
as [BLOCK_N, d] and used transposed for Q.K^T and as is for P.V (values are the same c_kv).

Rotary keys: the caller passes them already rotated (a [S_k, d_r] pre-pass, ~1% of the kernel's
bytes). Rotating here would repeat the rotation for every query tile and read cos/sin tables
(fp32, twice the bytes of the key) on every pass.

Softmax: online (running max and sum per row) in fp32, base-2 exponentials with the scale folded
into ``log2(e) * scale``. Output: ``o_lat`` in the query dtype and ``lse`` (natural log) in fp32. A
row with no valid key returns 0 and ``lse = -inf``, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    check_backend,
    check_latent_inputs,
    dummy,
    interpreting,
    pow2_split,
    prepare_latent_keys,
)

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc1, acc2, m_i, l_i,  # running state: [M, C1], [M, C2] fp32; [M] max (log2 units); [M] sum
    b_q1, b_q2, b_qr,  # query blocks [M, C1], [M, C2], [M, R]
    p_c, p_r,  # base pointers of this batch's c_kv and k_rope
    o_n, m_n,  # [N] key token indices (int64) and which of them take part
    stride_cn, stride_rn, qk_scale,
    D_C: tl.constexpr, D_R: tl.constexpr,
    BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_C2: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key tile of the online softmax; keys outside ``m_n`` are neither loaded nor counted."""
    o_c1 = tl.arange(0, BLOCK_C1)
    o_r = tl.arange(0, BLOCK_R)
    # masked loads never touch memory, so NaN in unused cache slots cannot enter the sums
    b_c1 = tl.load(p_c + o_n[:, None] * stride_cn + o_c1[None, :],
                   mask=m_n[:, None] & (o_c1 < D_C)[None, :], other=0.0)
    b_kr = tl.load(p_r + o_n[:, None] * stride_rn + o_r[None, :],
                   mask=m_n[:, None] & (o_r < D_R)[None, :], other=0.0)
    if UPCAST:  # interpreter only: it cannot multiply bf16 (exact widening, same products as the MMA)
        b_c1, b_kr = b_c1.to(tl.float32), b_kr.to(tl.float32)
    # [M, C1] x [C1, N] -> [M, N]
    b_s = tl.dot(b_q1, tl.trans(b_c1), input_precision=PRECISION)
    b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
    if HAS_C2:
        o_c2 = BLOCK_C1 + tl.arange(0, BLOCK_C2)
        b_c2 = tl.load(p_c + o_n[:, None] * stride_cn + o_c2[None, :],
                       mask=m_n[:, None] & (o_c2 < D_C)[None, :], other=0.0)
        if UPCAST:
            b_c2 = b_c2.to(tl.float32)
        b_s += tl.dot(b_q2, tl.trans(b_c2), input_precision=PRECISION)
    b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet
    alpha = tl.exp2(m_i - m_safe)
    b_p = tl.exp2(b_s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # P is rounded to the input dtype for the second MMA, as flash attention does
    b_p = b_p.to(p_c.dtype.element_ty)
    if UPCAST:
        b_p = b_p.to(tl.float32)
    # [M, N] x [N, C1] -> [M, C1]: the values are the same c_kv tile
    acc1 = acc1 * alpha[:, None] + tl.dot(b_p, b_c1, input_precision=PRECISION)
    if HAS_C2:
        acc2 = acc2 * alpha[:, None] + tl.dot(b_p, b_c2, input_precision=PRECISION)
    return acc1, acc2, m_new, l_i


@triton.jit
def _store_rows(
    acc1, acc2, m_i, l_i, p_o, p_lse, o_row, o_lse, m_row,
    D_C: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr, HAS_C2: tl.constexpr,
):
    """Normalise and store [M] rows: ``o = acc / l`` (0 where l == 0), ``lse = ln(2) * (m + log2 l)``."""
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    o_c1 = tl.arange(0, BLOCK_C1)
    tl.store(p_o + o_row[:, None] + o_c1[None, :], (acc1 * inv[:, None]).to(p_o.dtype.element_ty),
             mask=m_row[:, None] & (o_c1 < D_C)[None, :])
    if HAS_C2:
        o_c2 = BLOCK_C1 + tl.arange(0, BLOCK_C2)
        tl.store(p_o + o_row[:, None] + o_c2[None, :], (acc2 * inv[:, None]).to(p_o.dtype.element_ty),
                 mask=m_row[:, None] & (o_c2 < D_C)[None, :])
    b_lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(p_lse + o_lse, b_lse, mask=m_row)


@triton.jit
def _latent_attention_fwd_kernel(
    q_lat, q_rope, ckv, k_rope, k_len, k_valid, ckv_new, k_rope_new, o_lat, lse,
    stride_qb, stride_qs, stride_qh,  # q_lat
    stride_pb, stride_ps, stride_ph,  # q_rope
    stride_cb, stride_cn, stride_rb, stride_rn,  # context c_kv, k_rope
    stride_nb, stride_nn, stride_kb, stride_kn,  # chunk c_kv, k_rope
    stride_vb,  # k_valid
    stride_ob, stride_os, stride_oh,  # o_lat; lse is contiguous [B, S_q, H]
    S_Q, S_CTX, S_NEW, qk_scale,
    H: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_C2: tl.constexpr, HAS_LEN: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    i_m, i_b = tl.program_id(0), tl.program_id(1)
    i_b64 = i_b.to(tl.int64)
    # rows of the tile: r = s * H + h, every head of a query shares the keys
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = o_m < S_Q * H
    o_s, o_h = o_m // H, o_m % H
    o_q = i_b64 * stride_qb + o_s.to(tl.int64) * stride_qs + o_h * stride_qh
    o_p = i_b64 * stride_pb + o_s.to(tl.int64) * stride_ps + o_h * stride_ph
    o_c1 = tl.arange(0, BLOCK_C1)
    o_c2 = BLOCK_C1 + tl.arange(0, BLOCK_C2)
    o_r = tl.arange(0, BLOCK_R)
    b_q1 = tl.load(q_lat + o_q[:, None] + o_c1[None, :], mask=m_row[:, None] & (o_c1 < D_C)[None, :], other=0.0)
    b_q2 = tl.load(q_lat + o_q[:, None] + o_c2[None, :], mask=m_row[:, None] & (o_c2 < D_C)[None, :], other=0.0)
    b_qr = tl.load(q_rope + o_p[:, None] + o_r[None, :], mask=m_row[:, None] & (o_r < D_R)[None, :], other=0.0)
    if UPCAST:
        b_q1, b_q2, b_qr = b_q1.to(tl.float32), b_q2.to(tl.float32), b_qr.to(tl.float32)

    acc1 = tl.zeros([BLOCK_M, BLOCK_C1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- context: keys [0, k_end) of the cache ---------------------------------------------------
    k_end = S_CTX
    if HAS_LEN:
        k_end = tl.minimum(tl.maximum(tl.load(k_len + i_b).to(tl.int32), 0), S_CTX)
    p_c = ckv + i_b64 * stride_cb
    p_r = k_rope + i_b64 * stride_rb
    for start in range(0, k_end, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < k_end
        if HAS_VALID:
            m_n = m_n & (tl.load(k_valid + i_b64 * stride_vb + o_n, mask=m_n, other=0) != 0)
        acc1, acc2, m_i, l_i = _attend_tile(
            acc1, acc2, m_i, l_i, b_q1, b_q2, b_qr, p_c, p_r, o_n.to(tl.int64), m_n, stride_cn, stride_rn,
            qk_scale, D_C, D_R, BLOCK_C1, BLOCK_C2, BLOCK_R, HAS_C2, PRECISION, UPCAST)

    # ---- current chunk: all S_new keys ---------------------------------------------------------------
    p_c = ckv_new + i_b64 * stride_nb
    p_r = k_rope_new + i_b64 * stride_kb
    for start in range(0, S_NEW, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        acc1, acc2, m_i, l_i = _attend_tile(
            acc1, acc2, m_i, l_i, b_q1, b_q2, b_qr, p_c, p_r, o_n.to(tl.int64), o_n < S_NEW, stride_nn,
            stride_kn, qk_scale, D_C, D_R, BLOCK_C1, BLOCK_C2, BLOCK_R, HAS_C2, PRECISION, UPCAST)

    o_o = i_b64 * stride_ob + o_s.to(tl.int64) * stride_os + o_h * stride_oh
    o_lse = i_b64 * S_Q * H + o_m
    _store_rows(acc1, acc2, m_i, l_i, o_lat, lse, o_o, o_lse, m_row, D_C, BLOCK_C1, BLOCK_C2, HAS_C2)


# configurations tried on a GPU (the interpreter runs one fixed configuration)
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2)]
]
_latent_attention_fwd_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["H", "D_C", "D_R", "HAS_VALID"])(
    _latent_attention_fwd_kernel
)


def _launch(q_lat, q_rope, ckv, k_rope, k_len, k_valid, ckv_new, k_rope_new, s_ctx, s_new, scale, block_m, block_n):
    batch, s_q, heads, d_c = q_lat.shape
    d_r = q_rope.shape[-1]
    o_lat = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    lse = torch.empty((batch, s_q, heads), dtype=torch.float32, device=q_lat.device)
    if o_lat.numel() == 0:
        return o_lat, lse
    check_backend(_latent_attention_fwd_kernel, q_lat)
    c1, c2 = pow2_split(d_c)
    ckv_new = dummy(q_lat) if ckv_new is None else ckv_new
    k_rope_new = dummy(q_lat) if k_rope_new is None else k_rope_new
    args = [
        q_lat, q_rope, ckv, k_rope,
        dummy(q_lat, torch.int32) if k_len is None else k_len,
        dummy(q_lat, torch.uint8) if k_valid is None else k_valid,
        ckv_new, k_rope_new, o_lat, lse,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        ckv.stride(0), ckv.stride(1), k_rope.stride(0), k_rope.stride(1),
        ckv_new.stride(0), ckv_new.stride(1) if ckv_new.ndim > 1 else 0,
        k_rope_new.stride(0), k_rope_new.stride(1) if k_rope_new.ndim > 1 else 0,
        0 if k_valid is None else k_valid.stride(0),
        o_lat.stride(0), o_lat.stride(1), o_lat.stride(2),
        s_q, s_ctx, s_new, scale * LOG2E,
    ]
    meta = dict(
        H=heads, D_C=d_c, D_R=d_r, BLOCK_C1=c1, BLOCK_C2=max(c2, 16), BLOCK_R=max(16, triton.next_power_of_2(d_r)),
        HAS_C2=c2 > 0, HAS_LEN=k_len is not None, HAS_VALID=k_valid is not None,
        PRECISION="ieee" if q_lat.dtype == torch.float32 else None,
        UPCAST=interpreting() and q_lat.dtype == torch.bfloat16,
    )
    rows = s_q * heads
    if block_m is None and block_n is None and not interpreting():
        grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]), batch)  # noqa: E731
        _latent_attention_fwd_tuned[grid](*args, **meta)
    else:
        block_m, block_n = block_m or 64, block_n or 64
        grid = (triton.cdiv(rows, block_m), batch)
        _latent_attention_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    return o_lat, lse


def latent_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    *,
    k_len: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    ckv_new: torch.Tensor | None = None,
    k_rope_new: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention of a chunk over ``[context | chunk]`` read from the latent cache.

    Args:
        q_lat: [B, S_q, H, d_c] queries with W_UK folded in (fp16, bf16 or fp32).
        q_rope: [B, S_q, H, d_r] rotated rotary part of the queries.
        ckv: [B, S_ctx, d_c] cached latents (keys and values); any token stride, unit column stride,
            so a column slice of the cache rows ``[c_kv | k_rope]`` is passed without a copy.
            S_ctx may be 0 (nothing cached yet).
        k_rope: [B, S_ctx, d_r] rotated shared rotary keys of the context.
        scale: softmax scale, 1/sqrt(d_nope + d_r) of the unabsorbed head.
        k_len: [B] int, context keys ``j >= k_len[b]`` are ignored and never read (clamped to
            [0, S_ctx]); None means S_ctx.
        k_valid: [B, S_ctx] bool, False marks unused slots (they may hold NaN); None means all.
        ckv_new: [B, S_new, d_c] latents of the current chunk (every query sees all of them), or None.
        k_rope_new: [B, S_new, d_r] its rotated rotary keys; given together with ``ckv_new``.
        block_m, block_n: tile sizes (powers of two >= 16); None picks them (autotuned on a GPU).
    Returns:
        o_lat: [B, S_q, H, d_c] in q_lat's dtype (apply W_UV afterwards);
        lse: [B, S_q, H] fp32 natural log-sum-exp of the scaled scores (-inf where no key is valid).
    Raises:
        ValueError: on inconsistent shapes, dtypes or devices.
    """
    q_lat, q_rope, ckv, k_rope, k_len, k_valid, ckv_new, k_rope_new = check_latent_inputs(
        q_lat, q_rope, ckv, k_rope, scale, k_len, k_valid, ckv_new, k_rope_new)
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    s_ctx, s_new = ckv.shape[1], 0 if ckv_new is None else ckv_new.shape[1]
    ckv, k_rope, ckv_new, k_rope_new = prepare_latent_keys(ckv, k_rope, ckv_new, k_rope_new)
    return _launch(q_lat, q_rope, ckv, k_rope, k_len, k_valid, ckv_new, k_rope_new, s_ctx, s_new, float(scale),
                   block_m, block_n)


__all__ = ["latent_attention"]
