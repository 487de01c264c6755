"""3-D rotary position embedding over (time, height, width), with angles computed on the fly.

Layout convention ("split halves", kernel friendly): a rotary vector of width ``d`` is read as
``[x1 | x2]`` with ``x1 = x[..., :d/2]`` and ``x2 = x[..., d/2:]``; pair ``j`` is ``(x1[j], x2[j])``.
The ``d/2`` pairs are split into a temporal, a height and a width group. Every group has its own
frequency ladder ``theta ** (-j / n_group)``; a token at (t, h, w) rotates pair ``j`` of the temporal
group by ``t * f_t[j]`` and so on. Because q and k come from learned projections, this fixed
permutation of dimensions is as expressive as the interleaved layout of the original papers.

Temporal ids are plain integers with no upper bound (a day of video is > 1.3 M latent frames), so
angles are computed in float64 and reduced modulo 2*pi before cos/sin; no table caps the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def split_rope_pairs(dim: int) -> tuple[int, int, int]:
    """Split a rotary width into (temporal, height, width) pair counts.

    Height and width get ``(dim/2) // 3`` pairs each and time gets the rest, as Wan2.1 does.

    Raises:
        ValueError: if ``dim`` is odd or too small to give every axis at least one pair.
    """
    if dim % 2 != 0 or dim < 6:
        raise ValueError(f"{dim=} must be even and >= 6 to split into temporal/height/width rotary pairs")
    pairs = dim // 2
    n_hw = pairs // 3
    return pairs - 2 * n_hw, n_hw, n_hw


@dataclass(frozen=True)
class Rope3D:
    """Frequencies of a 3-D rotary embedding of width ``dim``."""

    dim: int  # rotary width (per head for MHA, the shared decoupled key width for MLA)
    theta: float = 10000.0  # base of the frequency ladder

    def __post_init__(self) -> None:
        split_rope_pairs(self.dim)  # validates

    @property
    def pairs(self) -> tuple[int, int, int]:
        return split_rope_pairs(self.dim)

    def _inv_freq(self, n: int) -> torch.Tensor:
        # float64 so that t * f stays exact enough for t in the millions
        return self.theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))

    def temporal_angles(self, t: torch.Tensor) -> torch.Tensor:
        """Angles of the temporal group. t: [N] int64 -> [N, n_t] float64 in [0, 2*pi)."""
        n_t, _, _ = self.pairs
        ang = t.to(torch.float64)[:, None] * self._inv_freq(n_t)[None, :]
        return torch.remainder(ang, 2 * math.pi)

    def spatial_angles(self, height: int, width: int) -> torch.Tensor:
        """Angles of the height and width groups for a row-major grid -> [height*width, n_h + n_w]."""
        _, n_h, n_w = self.pairs
        hh = torch.arange(height, dtype=torch.float64)[:, None] * self._inv_freq(n_h)[None, :]  # (h, n_h)
        ww = torch.arange(width, dtype=torch.float64)[:, None] * self._inv_freq(n_w)[None, :]  # (w, n_w)
        # (h, 1, n_h), (1, w, n_w) -> (h, w, n_h + n_w) -> (h*w, n_h + n_w)
        grid = torch.cat([hh[:, None, :].expand(height, width, n_h), ww[None, :, :].expand(height, width, n_w)], dim=-1)
        return grid.reshape(height * width, n_h + n_w)

    def posed_spatial_angles(self, height: int, width: int, offsets: torch.Tensor) -> torch.Tensor:
        """Spatial angles of frames whose grids sit at per-frame offsets (a camera's pose in tokens).

        Token (i, j) of a frame at offset (oy, ox) is placed at (i + oy, j + ox): tokens that see the
        same world position get the same spatial angles in every frame, so attention between them
        depends only on time, wherever the camera is.

        Args:
            offsets: [F, 2] (y, x) offsets in tokens (integers or fractions).
        Returns:
            [F * height * width, n_h + n_w] float64.
        """
        _, n_h, n_w = self.pairs
        off = offsets.to(torch.float64)
        hh = (torch.arange(height, dtype=torch.float64)[None, :] + off[:, 0:1])[..., None] * self._inv_freq(
            n_h
        )  # (F, h, n_h)
        ww = (torch.arange(width, dtype=torch.float64)[None, :] + off[:, 1:2])[..., None] * self._inv_freq(
            n_w
        )  # (F, w, n_w)
        n_f = off.shape[0]
        # (F, h, 1, n_h), (F, 1, w, n_w) -> (F, h, w, n_h + n_w) -> (F*h*w, n_h + n_w)
        grid = torch.cat(
            [hh[:, :, None, :].expand(n_f, height, width, n_h), ww[:, None, :, :].expand(n_f, height, width, n_w)],
            dim=-1,
        )
        return torch.remainder(grid.reshape(n_f * height * width, n_h + n_w), 2 * math.pi)

    def frame_angles(
        self, frame_ids: torch.Tensor, height: int, width: int, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Angles of every token of the given frames: [F * height * width, dim / 2] float64.

        Args:
            frame_ids: [F] int64 temporal ids.
            offsets: optional [F, 2] per-frame grid offsets (camera poses in tokens); see
                :meth:`posed_spatial_angles`. None: every frame's grid starts at (0, 0).
        """
        t_ang = self.temporal_angles(frame_ids)  # (F, n_t)
        n_frames, hw = t_ang.shape[0], height * width
        if offsets is None:
            s_ang = self.spatial_angles(height, width)[None].expand(n_frames, hw, -1)  # (F, hw, n_hw)
        else:  # (F*hw, n_hw) -> (F, hw, n_hw)
            s_ang = self.posed_spatial_angles(height, width, offsets).reshape(n_frames, hw, -1)
        # (F, 1, n_t) ++ (F, hw, n_hw) -> (F, hw, pairs) -> (F*hw, pairs)
        return torch.cat([t_ang[:, None, :].expand(n_frames, hw, -1), s_ang], dim=-1).reshape(n_frames * hw, -1)

    def cos_sin(
        self, frame_ids: torch.Tensor, height: int, width: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every token of the given frames (frame-major, then row-major grid).

        Args:
            frame_ids: [F] int64 temporal ids (any size, no upper bound).
            height, width: token grid of one frame.
        Returns:
            cos, sin: [F * height * width, dim / 2] in ``dtype``.
        """
        ang = self.frame_angles(frame_ids, height, width)
        return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the given angles.

    Args:
        x: [..., S, (H,) D] where the token axis S matches cos/sin; pass cos/sin already broadcastable
           to ``x[..., :D/2]`` (e.g. [S, 1, D/2] for per-head x of shape [B, S, H, D]).
        cos, sin: [..., D/2].
    Returns:
        Tensor of the same shape and dtype as x.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` by angle ``j`` (the layout of Wan and most video DiTs).

    Same angles as :func:`apply_rope` (pair ``j`` of the temporal, then height, then width group), only
    the pairs sit side by side instead of in split halves, so Wan checkpoints run without permuting
    their q/k projections.

    Args:
        x: [..., D]; cos, sin: broadcastable to [..., D/2].
    Returns:
        Tensor of the same shape and dtype as x.
    """
    # (..., D) -> (..., D/2, 2)
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    # (..., D/2) x2 -> (..., D/2, 2) -> (..., D)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
