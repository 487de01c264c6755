"""Where every model family's attention meets the cache: the per-stream context, and cached MHA.

A family's attention takes the batch of chunk tokens and one :class:`StreamContext` per stream.
Projections run batched; attention runs per stream, because each stream has its own cache. When a
context carries an append plan (the re-cache pass of the clean chunk), the chunk's rows are written
into that stream's cache for this layer. The tiny family's modules are in workers/models/tiny/attention.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ops import dispatch
from ops.latent_cache import AppendPlan, LatentKVCache


@dataclass
class StreamContext:
    """Per stream, per forward pass: its cache, rotary tables and (re-cache pass) where to write."""

    cache: LatentKVCache
    k_cos: torch.Tensor  # [S_ctx + S, rope/2] keys: valid cache tokens in slot order, then the chunk
    k_sin: torch.Tensor
    q_cos: torch.Tensor  # [S, rope/2] the chunk's queries
    q_sin: torch.Tensor
    plan: AppendPlan | None = None  # set on the re-cache pass
    slots: torch.Tensor | None = None  # slot frames to attend to; None = every valid slot
    sink_tokens: int = 0  # sparse memory: context tokens of the sink (always read)
    window_start: int = 0  # sparse memory: first context token of the local window (always read)


def cached_mha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    ctxs: list[StreamContext],
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention of each stream's chunk over its cached K/V rows and itself; writes rows on a re-cache pass.

    The cache (kind ``mha``) holds ``[k (H*D) | v (H*D)]`` per token, k unrotated; ``rotate`` applies
    the family's RoPE layout (split halves or interleaved pairs) to keys and queries on read.

    Args:
        q, k, v: [B, S, H, D] of the chunk's tokens (k after any q/k norm, not rotated).
        ctxs: one StreamContext per batch row.
    Returns:
        [B, S, H, D] attention output.
    """
    b, s, heads, d = q.shape
    outs = []
    for i, ctx in enumerate(ctxs):
        rows, _ = ctx.cache.read(layer, q.dtype, ctx.slots)  # (S_ctx, 2*H*D)
        # (S_ctx, 2*H*D) -> (S_ctx, 2, H, D)
        rows = rows.reshape(-1, 2, heads, d)
        k_all = torch.cat([rows[:, 0], k[i]], dim=0)  # (S_ctx + S, H, D)
        v_all = torch.cat([rows[:, 1], v[i]], dim=0)
        k_rot = rotate(k_all, ctx.k_cos[:, None, :], ctx.k_sin[:, None, :])
        q_rot = rotate(q[i], ctx.q_cos[:, None, :], ctx.q_sin[:, None, :])
        outs.append(dispatch.mha(q_rot, k_rot, v_all))
        if ctx.plan is not None:
            # (S, H, D) x2 -> (S, H*D) x2 -> (S, 2*H*D): the [k | v] row that read() splits again
            ctx.cache.write_slots(layer, ctx.plan.slots, torch.cat([k[i].reshape(s, -1), v[i].reshape(s, -1)], dim=-1))
    return torch.stack(outs)
