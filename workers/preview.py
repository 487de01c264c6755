"""Preview images of a stream's newest frame: a small PNG, made without an imaging library.

The worker sends one with a step's progress now and then; the dashboard serves it by (stream id,
chunk index), so no client-supplied path ever reaches the file system.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

MAX_SIDE = 256  # previews are downscaled (by an integer stride) until both sides fit


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


def preview_png(frames: torch.Tensor, max_side: int = MAX_SIDE) -> bytes:
    """PNG of the last of ``frames`` [N, H, W, 3] uint8, strided down so both sides are <= ``max_side``."""
    frame = frames[-1].cpu().numpy()
    stride = max(1, -(-max(frame.shape[:2]) // max_side))
    return encode_png(np.ascontiguousarray(frame[::stride, ::stride]))
