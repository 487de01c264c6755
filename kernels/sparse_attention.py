"""Block-sparse absorbed-MLA attention: each head group reads only the context blocks it selected.

Layout of the keys (same two ranges as :mod:`kernels.latent_attention`):

    context  [0, k_len)      cut into blocks of ``block_size`` tokens; block i = tokens [i*bs, (i+1)*bs)
      ├─ selected blocks     per (batch, head group, query group): ``block_idx[..., :block_cnt]``
      └─ local window        tokens [window_start, k_len): always attended, densely
    chunk    [0, S_new)      the current chunk: always attended

Queries are grouped twice: ``q_group`` consecutive query tokens share one selection (OmniMem's
query-shared selection), and ``H / H_g`` consecutive heads form a head group with one block list.
Different head groups read different, non-contiguous blocks straight from the cache (per-head
scattered access): nothing is gathered into a selected-KV buffer. One program covers up to
``BLOCK_M`` rows of one (query group, head group); rows are (query, head) pairs, so heads of a group
share each key tile, as in the dense kernel.

A selected block is masked to ``[0, min(k_len, window_start))`` and by ``k_valid``: tokens of the
local window inside a selected block are not counted twice, and entries past ``block_cnt`` are never
read (they may hold any value; the tests put 2**31 - 1 there). Selected indices must be distinct.

The key-tile update is :func:`kernels.latent_attention._attend_tile`, shared with the dense kernel.
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
from kernels.latent_attention import LOG2E, _attend_tile, _store_rows


@triton.jit
def _sparse_latent_attention_fwd_kernel(
    q_lat, q_rope, ckv, k_rope, k_len, k_valid, win_start, block_idx, block_cnt, ckv_new, k_rope_new, o_lat, lse,
    stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
    stride_cb, stride_cn, stride_rb, stride_rn,
    stride_nb, stride_nn, stride_kb, stride_kn,
    stride_vb,
    stride_ib, stride_ih, stride_ig,  # block_idx [B, H_g, N_QG, K_SEL], last stride 1
    stride_jb, stride_jh,  # block_cnt [B, H_g, N_QG], last stride 1
    stride_ob, stride_os, stride_oh,
    S_Q, S_CTX, S_NEW, N_QG, K_SEL, qk_scale,
    H: tl.constexpr, G: tl.constexpr, QG: tl.constexpr,
    D_C: tl.constexpr, D_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_C2: tl.constexpr, HAS_LEN: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WIN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    i_b64 = i_b.to(tl.int64)
    # program -> (head group, query group, tile of that group's QG*G rows)
    TILES = (QG * G + BLOCK_M - 1) // BLOCK_M
    i_t = i_p % TILES
    i_g = (i_p // TILES) % N_QG
    i_hg = i_p // (TILES * N_QG)
    o_m = i_t * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the group: (query, head) pairs
    o_s = i_g * QG + o_m // G
    o_h = i_hg * G + o_m % G
    m_row = (o_m < QG * G) & (o_s < S_Q)
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

    k_end = S_CTX
    if HAS_LEN:
        k_end = tl.minimum(tl.maximum(tl.load(k_len + i_b).to(tl.int32), 0), S_CTX)
    w_start = k_end
    if HAS_WIN:
        w_start = tl.minimum(tl.maximum(tl.load(win_start + i_b).to(tl.int32), 0), k_end)
    p_c = ckv + i_b64 * stride_cb
    p_r = k_rope + i_b64 * stride_rb
    p_v = k_valid + i_b64 * stride_vb

    # ---- selected context blocks: scattered, per head group ------------------------------------------
    n_sel = tl.load(block_cnt + i_b64 * stride_jb + i_hg * stride_jh + i_g)
    n_sel = tl.minimum(tl.maximum(n_sel, 0), K_SEL)
    p_idx = block_idx + i_b64 * stride_ib + i_hg * stride_ih + i_g * stride_ig
    for i in range(0, n_sel):
        i_blk = tl.load(p_idx + i).to(tl.int64)
        o_n = i_blk * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = (o_n >= 0) & (o_n < w_start)  # the window part is attended below, once
        if HAS_VALID:
            m_n = m_n & (tl.load(p_v + o_n, mask=m_n, other=0) != 0)
        acc1, acc2, m_i, l_i = _attend_tile(
            acc1, acc2, m_i, l_i, b_q1, b_q2, b_qr, p_c, p_r, o_n, m_n, stride_cn, stride_rn,
            qk_scale, D_C, D_R, BLOCK_C1, BLOCK_C2, BLOCK_R, HAS_C2, PRECISION, UPCAST)

    # ---- local window: [w_start, k_end), dense -----------------------------------------------------
    for start in range(w_start, k_end, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < k_end
        if HAS_VALID:
            m_n = m_n & (tl.load(p_v + o_n, mask=m_n, other=0) != 0)
        acc1, acc2, m_i, l_i = _attend_tile(
            acc1, acc2, m_i, l_i, b_q1, b_q2, b_qr, p_c, p_r, o_n.to(tl.int64), m_n, stride_cn, stride_rn,
            qk_scale, D_C, D_R, BLOCK_C1, BLOCK_C2, BLOCK_R, HAS_C2, PRECISION, UPCAST)

    # ---- current chunk ---------------------------------------------------------------------------------
    p_c = ckv_new + i_b64 * stride_nb
    p_r = k_rope_new + i_b64 * stride_kb
    for start in range(0, S_NEW, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        acc1, acc2, m_i, l_i = _attend_tile(
            acc1, acc2, m_i, l_i, b_q1, b_q2, b_qr, p_c, p_r, o_n.to(tl.int64), o_n < S_NEW, stride_nn,
            stride_kn, qk_scale, D_C, D_R, BLOCK_C1, BLOCK_C2, BLOCK_R, HAS_C2, PRECISION, UPCAST)

    o_o = i_b64 * stride_ob + o_s.to(tl.int64) * stride_os + o_h * stride_oh
    o_lse = i_b64 * S_Q * H + o_s.to(tl.int64) * H + o_h
    _store_rows(acc1, acc2, m_i, l_i, o_lat, lse, o_o, o_lse, m_row, D_C, BLOCK_C1, BLOCK_C2, HAS_C2)


# configurations tried on a GPU when no block_m is given (the interpreter runs one fixed configuration)
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm, w, s in [(128, 8, 2), (128, 8, 3), (64, 4, 3), (64, 4, 2)]
]
_sparse_latent_attention_fwd_tuned = triton.autotune(
    configs=_GPU_CONFIGS, key=["H", "G", "QG", "D_C", "D_R", "BLOCK_N", "HAS_VALID"]
)(_sparse_latent_attention_fwd_kernel)


def _launch(q_lat, q_rope, ckv, k_rope, k_len, k_valid, window_start, block_idx, block_cnt, ckv_new, k_rope_new,
            s_ctx, s_new, scale, block_size, q_group, block_m, num_warps, num_stages):
    batch, s_q, heads, d_c = q_lat.shape
    d_r = q_rope.shape[-1]
    h_g, n_qg, k_sel = block_idx.shape[1:]
    group = heads // h_g
    o_lat = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    lse = torch.empty((batch, s_q, heads), dtype=torch.float32, device=q_lat.device)
    if o_lat.numel() == 0:
        return o_lat, lse
    check_backend(_sparse_latent_attention_fwd_kernel, q_lat)
    rows = q_group * group
    c1, c2 = pow2_split(d_c)
    ckv_new = dummy(q_lat) if ckv_new is None else ckv_new
    k_rope_new = dummy(q_lat) if k_rope_new is None else k_rope_new
    if k_sel == 0:  # nothing selected anywhere: a one-entry table whose count is 0
        block_idx = torch.zeros((batch, h_g, n_qg, 1), dtype=torch.int32, device=q_lat.device)
        block_cnt = torch.zeros_like(block_cnt)
        k_sel = 1
    args = [
        q_lat, q_rope, ckv, k_rope,
        dummy(q_lat, torch.int32) if k_len is None else k_len,
        dummy(q_lat, torch.uint8) if k_valid is None else k_valid,
        dummy(q_lat, torch.int32) if window_start is None else window_start,
        block_idx, block_cnt, ckv_new, k_rope_new, o_lat, lse,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        ckv.stride(0), ckv.stride(1), k_rope.stride(0), k_rope.stride(1),
        ckv_new.stride(0), ckv_new.stride(1) if ckv_new.ndim > 1 else 0,
        k_rope_new.stride(0), k_rope_new.stride(1) if k_rope_new.ndim > 1 else 0,
        0 if k_valid is None else k_valid.stride(0),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_cnt.stride(0), block_cnt.stride(1),
        o_lat.stride(0), o_lat.stride(1), o_lat.stride(2),
        s_q, s_ctx, s_new, n_qg, k_sel, scale * LOG2E,
    ]
    meta = dict(
        H=heads, G=group, QG=q_group, D_C=d_c, D_R=d_r, BLOCK_N=block_size, BLOCK_C1=c1, BLOCK_C2=max(c2, 16),
        BLOCK_R=max(16, triton.next_power_of_2(d_r)),
        HAS_C2=c2 > 0, HAS_LEN=k_len is not None, HAS_VALID=k_valid is not None, HAS_WIN=window_start is not None,
        PRECISION="ieee" if q_lat.dtype == torch.float32 else None,
        UPCAST=interpreting() and q_lat.dtype == torch.bfloat16,
    )
    if block_m is None and not interpreting():
        grid = lambda m: (h_g * n_qg * triton.cdiv(rows, m["BLOCK_M"]), batch)  # noqa: E731
        _sparse_latent_attention_fwd_tuned[grid](*args, **meta)
    else:
        block_m = block_m or min(64, max(16, triton.next_power_of_2(rows)))
        grid = (h_g * n_qg * triton.cdiv(rows, block_m), batch)
        _sparse_latent_attention_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, num_warps=num_warps,
                                                  num_stages=num_stages)
    return o_lat, lse


def sparse_latent_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    *,
    block_size: int,
    q_group: int,
    window_start: torch.Tensor | None = None,
    k_len: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    ckv_new: torch.Tensor | None = None,
    k_rope_new: torch.Tensor | None = None,
    block_m: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention over selected context blocks + local window + current chunk.

    Args:
        q_lat: [B, S_q, H, d_c]; q_rope: [B, S_q, H, d_r] (rotated); fp16, bf16 or fp32.
        ckv: [B, S_ctx, d_c]; k_rope: [B, S_ctx, d_r] (rotated): the cached context, unit column stride.
        scale: softmax scale, 1/sqrt(d_nope + d_r).
        block_idx: [B, H_g, N_qg, K] int32 selected context block indices per head group and query
            group (distinct; any order); H % H_g == 0, N_qg == ceil(S_q / q_group). Entries at and
            past ``block_cnt`` are ignored and never read.
        block_cnt: [B, H_g, N_qg] int32 number of valid entries (clamped to [0, K]).
        block_size: tokens per context block, a power of two >= 16 (also the kernel's key tile).
        q_group: consecutive queries sharing one selection (>= 1).
        window_start: [B] int or None: context tokens [window_start, k_len) are always attended;
            None means no local window.
        k_len: [B] int or None (S_ctx): context keys j >= k_len[b] are ignored.
        k_valid: [B, S_ctx] bool or None: False marks unused slots (they may hold NaN).
        ckv_new: [B, S_new, d_c] / k_rope_new: [B, S_new, d_r] or None: the current chunk, always attended.
        block_m, num_warps, num_stages: launch configuration; with block_m None the kernel is
            autotuned on a GPU (num_warps/num_stages then come from the tuned configurations).
    Returns:
        o_lat: [B, S_q, H, d_c] in q_lat's dtype; lse: [B, S_q, H] fp32 (-inf where nothing is attended).
    Raises:
        ValueError: on inconsistent shapes, dtypes or devices.
    """
    q_lat, q_rope, ckv, k_rope, k_len, k_valid, ckv_new, k_rope_new = check_latent_inputs(
        q_lat, q_rope, ckv, k_rope, scale, k_len, k_valid, ckv_new, k_rope_new)
    batch, s_q, heads, _ = q_lat.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{block_size=} must be a power of two >= 16")
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"{block_m=} must be a power of two >= 16")
    if q_group < 1:
        raise ValueError(f"{q_group=} must be >= 1")
    n_qg = -(-s_q // q_group)
    if block_idx.ndim != 4 or block_idx.dtype != torch.int32 or block_idx.device != q_lat.device:
        raise ValueError(f"block_idx must be int32 [B, H_g, N_qg, K] on {q_lat.device}, "
                         f"got {block_idx.dtype} {tuple(block_idx.shape)} on {block_idx.device}")
    h_g = block_idx.shape[1]
    if block_idx.shape[0] != batch or h_g < 1 or heads % h_g or block_idx.shape[2] != n_qg:
        raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B={batch}, H_g | H={heads}, "
                         f"N_qg=ceil(S_q/q_group)={n_qg}, K]")
    if block_cnt.dtype != torch.int32 or block_cnt.shape != block_idx.shape[:3] or block_cnt.device != q_lat.device:
        raise ValueError(f"block_cnt must be int32 {tuple(block_idx.shape[:3])}, "
                         f"got {block_cnt.dtype} {tuple(block_cnt.shape)}")
    if window_start is not None:
        if window_start.shape != (batch,) or window_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"window_start must be int [B={batch}], "
                             f"got {window_start.dtype} {tuple(window_start.shape)}")
        window_start = window_start.to(device=q_lat.device, dtype=torch.int32).contiguous()
    s_ctx, s_new = ckv.shape[1], 0 if ckv_new is None else ckv_new.shape[1]
    ckv, k_rope, ckv_new, k_rope_new = prepare_latent_keys(ckv, k_rope, ckv_new, k_rope_new)
    return _launch(q_lat, q_rope, ckv, k_rope, k_len, k_valid, window_start, block_idx.contiguous(),
                   block_cnt.contiguous(), ckv_new, k_rope_new, s_ctx, s_new, float(scale), block_size, q_group,
                   block_m, num_warps, num_stages)


__all__ = ["sparse_latent_attention"]
