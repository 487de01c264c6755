"""FP8 (e4m3) storage with an fp32 scale per group of values.

``quantize_fp8(x, group_dims)`` takes one scale per slice obtained by reducing ``x`` over
``group_dims``: reduce over the feature axis only for a per-token scale, over tokens and features of
one frame for a per-block scale.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
_TINY = 1e-12


def quantize_fp8(x: torch.Tensor, group_dims: tuple[int, ...] = (-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to e4m3 with one fp32 scale per group.

    Args:
        x: any float tensor.
        group_dims: dims reduced into one scale (kept with size 1 in the returned scale).
    Returns:
        q: fp8 tensor of x's shape; scale: fp32 with ``group_dims`` of size 1, so that
        ``q.float() * scale`` approximates x.
    """
    amax = x.float().abs().amax(dim=group_dims, keepdim=True)
    scale = (amax / FP8_MAX).clamp_min(_TINY)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` (scale broadcasts against q)."""
    return (q.float() * scale).to(dtype)
