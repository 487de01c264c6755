"""The one entry point the generator uses for attention over a chunk's context.

Inputs are one stream's tokens (no batch axis): streams have ragged contexts and are attended one
at a time, while every other layer of the model runs batched.

Backend, chosen per call: ``"auto"`` (the default) runs the Triton kernels of ``kernels/`` on CUDA
tensors and PyTorch on CPU tensors; ``"torch"`` or ``"triton"`` force one (Triton on CPU tensors needs
``TRITON_INTERPRET=1`` before the kernels are first imported). Set it with the environment variable
``LONGROLL_KERNELS`` or, scoped, with :func:`use_backend`. On the torch backend :func:`mha` and
:func:`latent` run PyTorch's fused attention (tested equal to the fp32 references in
:mod:`ops.attention`); :func:`latent_context` and :func:`sparse_latent` run the fp32 references
:mod:`ops.latent_attention` and :mod:`ops.sparse_attention`. ``kernels`` is imported only when a
Triton path is taken, so CPU runs never import Triton.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ops.latent_attention import latent_attention_varlen_ref
from ops.sparse_attention import select_blocks, sparse_latent_attention_ref

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("LONGROLL_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"LONGROLL_KERNELS={_backend!r} must be one of {BACKENDS}")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls on one backend: "auto", "torch" or "triton"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} must be one of {BACKENDS}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _triton(t: torch.Tensor) -> bool:
    if _backend == "auto":
        return t.is_cuda
    interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if _backend == "triton" and not t.is_cuda and not interp:
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return _backend == "triton"


def mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of every query over every key.

    Args:
        q: [S_q, H, D]; k: [S_k, H, D]; v: [S_k, H, D_v]
    Returns:
        [S_q, H, D_v]
    """
    # (S, H, D) -> (1, H, S, D)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale
    )
    return out[0].transpose(0, 1)


def latent(
    q_lat: torch.Tensor, q_rope: torch.Tensor, ckv: torch.Tensor, k_rope: torch.Tensor, scale: float
) -> torch.Tensor:
    """Absorbed-MLA attention: all heads share the latent keys ``[ckv | k_rope]`` and values ``ckv``.

    Args:
        q_lat: [S_q, H, d_c]; q_rope: [S_q, H, d_r] (rotated)
        ckv: [S_k, d_c]; k_rope: [S_k, d_r] (rotated)
        scale: 1/sqrt(d_nope + d_r)
    Returns:
        o_lat: [S_q, H, d_c]
    """
    if _triton(q_lat):
        from kernels.latent_attention import latent_attention

        dt = q_lat.dtype
        o_lat, _ = latent_attention(q_lat[None], q_rope[None].to(dt), ckv[None].to(dt), k_rope[None].to(dt), scale)
        return o_lat[0].to(ckv.dtype)
    s_q, heads, d_c = q_lat.shape
    # every head shares the keys: fold heads into the query axis, one GEMM each way
    # (S_q, H, d_c + d_r) -> (S_q*H, d_c + d_r)
    q = torch.cat([q_lat, q_rope], dim=-1).reshape(s_q * heads, -1)
    k = torch.cat([ckv, k_rope], dim=-1)  # (S_k, d_c + d_r)
    probs = torch.softmax((q @ k.T).float() * scale, dim=-1).to(ckv.dtype)  # (S_q*H, S_k)
    return (probs @ ckv).reshape(s_q, heads, d_c)


def _batch1(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t[None] for t in ts]


def latent_context(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    *,
    k_valid: torch.Tensor | None = None,
    ckv_new: torch.Tensor | None = None,
    k_rope_new: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention of one stream's chunk over ``[cached context | chunk]``, no concatenation.

    Args:
        q_lat: [S_q, H, d_c]; q_rope: [S_q, H, d_r] (rotated)
        ckv: [S_ctx, d_c]; k_rope: [S_ctx, d_r] (rotated): the context. ``ckv`` may be a column slice
            of the cache's rows (``cache.data[layer][:, :d_c]``: no copy); S_ctx may be 0.
        scale: 1/sqrt(d_nope + d_r)
        k_valid: [S_ctx] bool or None: False for unused cache slots (they may hold NaN).
        ckv_new: [S_new, d_c], k_rope_new: [S_new, d_r] (rotated) or None: the current chunk.
    Returns:
        o_lat: [S_q, H, d_c] in q_lat's dtype; lse: [S_q, H] fp32.
    """
    args = _batch1(q_lat, q_rope, ckv, k_rope)
    kw = dict(zip(("k_valid", "ckv_new", "k_rope_new"), _batch1(k_valid, ckv_new, k_rope_new)))
    if _triton(q_lat):
        from kernels.latent_attention import latent_attention

        o_lat, lse = latent_attention(*args, scale, **kw)
    else:
        o_lat, lse = latent_attention_varlen_ref(*args, scale, **kw)
    return o_lat[0], lse[0]


def sparse_latent(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    *,
    top_k: int,
    block_size: int = 64,
    q_group: int = 128,
    head_group: int = 1,
    window_start: int | None = None,
    local_start: int | None = None,
    sink_len: int = 0,
    k_valid: torch.Tensor | None = None,
    ckv_new: torch.Tensor | None = None,
    k_rope_new: torch.Tensor | None = None,
    summary: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse retrieval attention of one stream's chunk (OmniMem): select, then attend.

    Every ``q_group`` consecutive queries and ``head_group`` consecutive heads share one selection of
    ``top_k`` context blocks of ``block_size`` tokens (scored by :func:`ops.sparse_attention.select_blocks`,
    with adaptive window exclusion); each head group then reads only its blocks, plus the local window
    ``[window_start, S_ctx)`` and the whole current chunk.

    Args:
        q_lat: [S_q, H, d_c]; q_rope: [S_q, H, d_r] (rotated)
        ckv: [S_ctx, d_c]; k_rope: [S_ctx, d_r] (rotated): the context (as in :func:`latent_context`).
        scale: 1/sqrt(d_nope + d_r)
        top_k: context blocks selected per group (sink blocks included).
        block_size: tokens per block: a power of two >= 16 on the Triton path.
        q_group, head_group: queries / heads sharing one selection (head_group divides H).
        window_start: context token where the always-on local window starts; None: no window.
        local_start: start of the local region that leaves the candidates once history is long
            enough; None: ``window_start``.
        sink_len: context tokens [0, sink_len) are always selected.
        k_valid: [S_ctx] bool or None; ckv_new: [S_new, d_c], k_rope_new: [S_new, d_r] or None.
        summary: "mean" or "minmax" (Quest) block key summary.
    Returns:
        o_lat: [S_q, H, d_c] in q_lat's dtype; lse: [S_q, H] fp32.
    """
    dev = q_lat.device
    as_b = lambda x: None if x is None else torch.tensor([x], dtype=torch.int32, device=dev)  # noqa: E731
    args = _batch1(q_lat, q_rope, ckv, k_rope)
    valid, cn, kn = _batch1(k_valid, ckv_new, k_rope_new)
    win = as_b(window_start)
    idx, cnt = select_blocks(*args, top_k=top_k, block_size=block_size, q_group=q_group, head_group=head_group,
                             k_valid=valid, window_start=win, local_start=as_b(local_start), sink_len=sink_len,
                             summary=summary)
    kw = dict(block_size=block_size, q_group=q_group, window_start=win, k_valid=valid, ckv_new=cn, k_rope_new=kn)
    if _triton(q_lat):
        from kernels.sparse_attention import sparse_latent_attention

        o_lat, lse = sparse_latent_attention(*args, scale, idx, cnt, **kw)
    else:
        o_lat, lse = sparse_latent_attention_ref(*args, scale, idx, cnt, **kw)
    return o_lat[0], lse[0]
