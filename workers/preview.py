"""Preview images of a stream's newest frame: a small PNG, made without an imaging library.

The worker sends one with a step's progress now and then; the dashboard serves it by (stream id,
chunk index), so no client-supplied path ever reaches the file system. A chunk without decoded
frames (a model family with no VAE decoder yet) previews its newest latent frame in false colour.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

MAX_SIDE = 256  # previews are downscaled (by an integer stride) until both sides fit
MIN_LATENT_SIDE = 64  # latent previews are upscaled (nearest, integer factor) until the short side reaches this


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """8-bit RGB PNG of ``rgb`` [H, W, 3] uint8."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {tuple(rgb.shape)}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + (_chunk(b"IEND", b""))
    )


def preview_png(frames: torch.Tensor, max_side: int = MAX_SIDE, latents: torch.Tensor | None = None) -> bytes:
    """PNG of the newest frame of a chunk.

    Args:
        frames: [N, H, W, 3] uint8; the last one is shown, strided down so both sides are <= ``max_side``.
        max_side: longest side of a frame preview.
        latents: [F, C, H, W]; used only when ``frames`` is empty (see :func:`latent_preview_rgb`).

    Raises:
        ValueError: no frames and no usable latents (the worker logs it; a preview never fails a step).
    """
    if frames.numel() == 0:
        if latents is None:
            raise ValueError("no decoded frames to preview (pass latents= for a latent-only chunk)")
        return encode_png(latent_preview_rgb(latents))
    frame = frames[-1].cpu().numpy()
    stride = max(1, -(-max(frame.shape[:2]) // max_side))
    return encode_png(np.ascontiguousarray(frame[::stride, ::stride]))


def latent_preview_rgb(latents: torch.Tensor, min_side: int = MIN_LATENT_SIDE) -> np.ndarray:
    """False-colour [H*k, W*k, 3] uint8 of the newest latent frame ``latents[-1]``.

    Channels 0, 1, 2 become R, G, B (fewer channels are repeated), each min-max normalised over the
    frame (a constant channel is black), upscaled by the nearest integer ``k`` that makes the short
    side >= ``min_side``.
    """
    if latents.ndim != 4 or latents.shape[0] == 0 or latents.shape[1] == 0 or 0 in latents.shape[2:]:
        raise ValueError(f"expected latents [F, C, H, W] with no empty dimension, got {tuple(latents.shape)}")
    x = latents[-1, :3].detach().to("cpu", torch.float32)  # (C<=3, H, W)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    x = x[torch.arange(3) % x.shape[0]]  # (3, H, W)
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    rgb = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    k = max(1, -(-min_side // min(rgb.shape[:2])))
    return np.ascontiguousarray(rgb.repeat(k, axis=0).repeat(k, axis=1))
