"""Input checks and small launch helpers shared by the latent-attention kernels."""

from __future__ import annotations

import os

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pow2_split(d: int) -> tuple[int, int]:
    """Cover ``d`` columns with two power-of-two blocks (each >= 16, the smallest MMA width).

    Returns (c1, c2), c2 == 0 when one block suffices: 160 -> (128, 32), 224 -> (128, 128),
    64 -> (64, 0), 24 -> (16, 16), 8 -> (16, 0).
    """
    c1 = max(16, 1 << (d.bit_length() - 1)) if d > 0 else 16
    rem = d - c1
    c2 = 0 if rem <= 0 else max(16, 1 << (rem - 1).bit_length())
    return c1, c2


def dummy(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A one-element tensor standing in for an absent (never read) pointer argument."""
    return torch.zeros(1, dtype=dtype or like.dtype, device=like.device)


def _unit_col(t: torch.Tensor) -> torch.Tensor:
    """Keep any row strides, but the kernels index columns with stride 1; empty -> a dummy."""
    if t.numel() == 0:
        return torch.zeros((t.shape[0], 1, t.shape[-1]), dtype=t.dtype, device=t.device)
    return t if t.stride(-1) == 1 else t.contiguous()


def check_latent_inputs(q_lat, q_rope, ckv, k_rope, scale, k_len, k_valid, ckv_new, k_rope_new):
    """Validate the shared arguments of the latent kernels; return them ready to launch.

    Raises:
        ValueError: on inconsistent shapes, dtypes or devices (see the public functions' docstrings).
    """
    if q_lat.ndim != 4 or q_rope.ndim != 4 or q_lat.shape[:3] != q_rope.shape[:3]:
        raise ValueError(f"q_lat [B, S_q, H, d_c] and q_rope [B, S_q, H, d_r] expected, "
                         f"got {tuple(q_lat.shape)} {tuple(q_rope.shape)}")
    batch, _, _, d_c = q_lat.shape
    d_r = q_rope.shape[-1]
    if ckv.ndim != 3 or k_rope.ndim != 3 or ckv.shape[:2] != k_rope.shape[:2] or ckv.shape[0] != batch:
        raise ValueError(f"ckv [B={batch}, S_ctx, d_c] and k_rope [B, S_ctx, d_r] expected, "
                         f"got {tuple(ckv.shape)} {tuple(k_rope.shape)}")
    if ckv.shape[2] != d_c or k_rope.shape[2] != d_r:
        raise ValueError(f"key widths {ckv.shape[2]}/{k_rope.shape[2]} != query widths d_c={d_c}/d_r={d_r}")
    if (ckv_new is None) != (k_rope_new is None):
        raise ValueError("ckv_new and k_rope_new must be given together")
    tensors = [q_lat, q_rope, ckv, k_rope]
    if ckv_new is not None:
        if (ckv_new.ndim != 3 or k_rope_new.ndim != 3 or ckv_new.shape[:2] != k_rope_new.shape[:2]
                or ckv_new.shape[0] != batch or ckv_new.shape[2] != d_c or k_rope_new.shape[2] != d_r):
            raise ValueError(f"ckv_new [B={batch}, S_new, d_c={d_c}] and k_rope_new [B, S_new, d_r={d_r}] "
                             f"expected, got {tuple(ckv_new.shape)} {tuple(k_rope_new.shape)}")
        tensors += [ckv_new, k_rope_new]
    if q_lat.dtype not in DTYPES or any(t.dtype != q_lat.dtype for t in tensors):
        raise ValueError(f"queries and keys must share one dtype of {DTYPES}, got {[t.dtype for t in tensors]}")
    if any(t.device != q_lat.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"{scale=} must be a positive number (1/sqrt(d_nope + d_r))")
    s_ctx = ckv.shape[1]
    if k_len is not None:
        if k_len.shape != (batch,) or k_len.dtype not in (torch.int32, torch.int64) or k_len.device != q_lat.device:
            raise ValueError(f"k_len must be int32/int64 [B={batch}] on {q_lat.device}, "
                             f"got {k_len.dtype} {tuple(k_len.shape)} on {k_len.device}")
        k_len = k_len.to(torch.int32).contiguous()
    if k_valid is not None:
        if k_valid.dtype != torch.bool or tuple(k_valid.shape) != (batch, s_ctx) or k_valid.device != q_lat.device:
            raise ValueError(f"k_valid must be bool [B={batch}, S_ctx={s_ctx}] on {q_lat.device}, "
                             f"got {k_valid.dtype} {tuple(k_valid.shape)} on {k_valid.device}")
        k_valid = k_valid.contiguous().view(torch.uint8) if s_ctx > 0 else None
    return q_lat, q_rope, ckv, k_rope, k_len, k_valid, ckv_new, k_rope_new


def prepare_latent_keys(ckv, k_rope, ckv_new, k_rope_new):
    """Unit column strides (row strides kept: cache views need no copy); empty ranges -> dummies."""
    if ckv_new is not None and ckv_new.shape[1] == 0:
        ckv_new = k_rope_new = None
    if ckv_new is not None:
        ckv_new, k_rope_new = _unit_col(ckv_new), _unit_col(k_rope_new)
    return _unit_col(ckv), _unit_col(k_rope), ckv_new, k_rope_new


def check_backend(kernel, t: torch.Tensor) -> None:
    """CPU tensors can only run in the interpreter, which ``triton.jit`` picks when a module is imported.

    Raises:
        RuntimeError: if ``t`` is on the CPU but the kernel was compiled for a GPU.
    """
    if not t.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing {kernel.__module__}"
        )
