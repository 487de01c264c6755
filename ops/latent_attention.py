"""Reference of :func:`kernels.latent_attention.latent_attention`: same arguments, same ``(o_lat, lse)``.

The kernel reads keys from two ranges (the cached context, cut at ``k_len`` and masked by
``k_valid``, then the current chunk); here the two are concatenated with one validity mask and
handed to the plain fp32 :func:`ops.attention.latent_attention_ref`.
"""

from __future__ import annotations

import torch

from ops.attention import latent_attention_ref


def context_mask(
    batch: int, s_ctx: int, device: torch.device, k_len: torch.Tensor | None, k_valid: torch.Tensor | None
) -> torch.Tensor:
    """[B, S_ctx] bool: key j of the context takes part iff ``j < k_len[b]`` and ``k_valid[b, j]``."""
    mask = torch.ones(batch, s_ctx, dtype=torch.bool, device=device)
    if k_len is not None:
        mask &= torch.arange(s_ctx, device=device)[None, :] < k_len.to(device)[:, None]
    if k_valid is not None:
        mask &= k_valid.to(device)
    return mask


def latent_attention_varlen_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention over ``[context | chunk]`` in fp32.

    Args:
        q_lat: [B, S_q, H, d_c]; q_rope: [B, S_q, H, d_r] (rotated)
        ckv: [B, S_ctx, d_c]; k_rope: [B, S_ctx, d_r] (rotated); S_ctx may be 0
        scale: softmax scale, 1/sqrt(d_nope + d_r)
        k_len: [B] int or None: context keys j >= k_len[b] are ignored
        k_valid: [B, S_ctx] bool or None: False marks unused slots (may hold NaN)
        ckv_new: [B, S_new, d_c] or None; k_rope_new: [B, S_new, d_r] or None: the current chunk, all valid
    Returns:
        o_lat: [B, S_q, H, d_c] in q_lat's dtype; lse: [B, S_q, H] fp32 (-inf where no key is valid).
    Raises:
        ValueError: on inconsistent shapes.
    """
    if ckv.ndim != 3 or q_lat.ndim != 4:
        raise ValueError(f"ckv [B, S_ctx, d_c] and q_lat [B, S_q, H, d_c] expected, "
                         f"got {tuple(ckv.shape)} {tuple(q_lat.shape)}")
    if (ckv_new is None) != (k_rope_new is None):
        raise ValueError("ckv_new and k_rope_new must be given together")
    batch, s_ctx = ckv.shape[:2]
    mask = context_mask(batch, s_ctx, ckv.device, k_len, k_valid)
    if ckv_new is not None:
        # (B, S_ctx, .) ++ (B, S_new, .) -> (B, S_ctx + S_new, .)
        ckv = torch.cat([ckv, ckv_new.to(ckv.dtype)], dim=1)
        k_rope = torch.cat([k_rope, k_rope_new.to(k_rope.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones(batch, ckv_new.shape[1], dtype=torch.bool, device=mask.device)], dim=1)
    return latent_attention_ref(q_lat, q_rope, ckv, k_rope, mask, scale)
