"""The one entry point the generator uses for attention over a chunk's context.

On CPU it runs PyTorch's fused ``scaled_dot_product_attention`` (tested equal to the fp32 references
in :mod:`ops.attention`); Triton kernels for CUDA plug in here, so model code never chooses a backend.
Inputs are one stream's tokens (no batch axis): streams have ragged contexts and are attended one
at a time, while every other layer of the model runs batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    s_q, heads, d_c = q_lat.shape
    # every head shares the keys: fold heads into the query axis, one GEMM each way
    # (S_q, H, d_c + d_r) -> (S_q*H, d_c + d_r)
    q = torch.cat([q_lat, q_rope], dim=-1).reshape(s_q * heads, -1)
    k = torch.cat([ckv, k_rope], dim=-1)  # (S_k, d_c + d_r)
    probs = torch.softmax((q @ k.T).float() * scale, dim=-1).to(ckv.dtype)  # (S_q*H, S_k)
    return (probs @ ckv).reshape(s_q, heads, d_c)
