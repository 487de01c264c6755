"""Reference attention of a chunk of queries over its context: plain fp32 PyTorch.

These functions are the ground truth every kernel in ``kernels/`` is tested against. They favour
clarity over speed: scores are materialised, softmax is explicit, and everything runs in fp32.

Context layout. The keys are ``[sink | memory | local window | current chunk]`` concatenated along
the token axis; a ``k_valid`` mask marks which key slots hold data (partly filled caches). Attention
inside the current chunk is full (all frames of a chunk see each other) and every query sees every
valid context key: that is the chunk-causal pattern of Self-Forcing/CausVid at inference.

A query row whose keys are all masked returns 0 with ``lse = -inf``. Masked key/value slots may hold
anything, NaN included (caches fill unused slots with NaN so that a kernel reading them fails loudly).

MLA (VideoMLA / DeepSeek-V2 style). Each cached token stores a shared latent ``c_kv`` (d_c) and one
shared rotary key ``k_rope`` (d_r). Per head h::

    k_h = [W_UK[h] @ c_kv  |  k_rope]          v_h = W_UV[h] @ c_kv
    q_h = [q_nope_h        |  q_rope_h]

Up-projected form: build k_h, v_h for every token, then ordinary attention.
Absorbed form: fold W_UK into the query (``q_lat_h = W_UK[h]^T q_nope_h``), attend in latent space
with keys ``[c_kv | k_rope]`` and values ``c_kv`` shared by all heads (multi-query attention), then
fold W_UV into the output (``o_h = W_UV[h] @ o_lat_h``). Both give the same result up to rounding.
"""

from __future__ import annotations

import torch


def _check_valid(k_valid: torch.Tensor | None, batch: int, s_k: int) -> None:
    if k_valid is not None and (k_valid.dtype != torch.bool or tuple(k_valid.shape) != (batch, s_k)):
        raise ValueError(f"k_valid must be bool [B={batch}, S_k={s_k}], got {k_valid.dtype} {tuple(k_valid.shape)}")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every valid key, in fp32.

    Args:
        q: [B, S_q, H, D_qk]
        k: [B, S_k, H_k, D_qk] with H_k == H, or H_k == 1 (one key shared by all heads: MQA)
        v: [B, S_k, H_k, D_v]
        k_valid: [B, S_k] bool, True where the key slot holds data; None means all valid.
        scale: softmax scale; default 1/sqrt(D_qk).
    Returns:
        out: [B, S_q, H, D_v] in q's dtype; lse: [B, S_q, H] fp32 log-sum-exp of the scaled scores.
    Raises:
        ValueError: on inconsistent shapes.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D, got {q.ndim=} {k.ndim=} {v.ndim=}")
    batch, s_q, heads, d_qk = q.shape
    s_k, h_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != d_qk or h_k not in (1, heads):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
    _check_valid(k_valid, batch, s_k)
    scale = d_qk**-0.5 if scale is None else scale

    qf, kf, vf = q.float(), k.float(), v.float()
    if k_valid is not None:
        # masked slots may hold NaN: zero them so that 0 * NaN never reaches the output
        kf = torch.where(k_valid[:, :, None, None], kf, 0.0)
        vf = torch.where(k_valid[:, :, None, None], vf, 0.0)
    # (B, S_q, H, D) x (B, S_k, H_k, D) -> (B, H, S_q, S_k)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf.expand(-1, -1, heads, -1)) * scale
    if k_valid is not None:
        scores = scores.masked_fill(~k_valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S_q)
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no valid key: exp(-inf - (-inf))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf.expand(-1, -1, heads, -1))
    return out.to(q.dtype), lse.transpose(1, 2).contiguous()


def latent_attention_ref(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA core: multi-query attention in latent space.

    Args:
        q_lat: [B, S_q, H, d_c] queries with W_UK folded in.
        q_rope: [B, S_q, H, d_r] rotated rotary part of the queries.
        ckv: [B, S_k, d_c] latent of every key token (also the value).
        k_rope: [B, S_k, d_r] rotated shared rotary key.
        k_valid: [B, S_k] bool or None.
        scale: softmax scale. The MLA scale is 1/sqrt(d_nope + d_r) of the *unabsorbed* head, so the
            caller must pass it (there is no default that would be right).
    Returns:
        o_lat: [B, S_q, H, d_c] latent output (W_UV not yet applied); lse: [B, S_q, H] fp32.
    """
    if scale is None:
        raise ValueError("latent_attention_ref needs an explicit scale (1/sqrt(d_nope + d_r))")
    if ckv.ndim != 3 or k_rope.ndim != 3 or ckv.shape[:2] != k_rope.shape[:2]:
        raise ValueError(
            f"ckv [B, S_k, d_c] and k_rope [B, S_k, d_r] expected, got {tuple(ckv.shape)} {tuple(k_rope.shape)}"
        )
    q = torch.cat([q_lat, q_rope], dim=-1)  # (B, S_q, H, d_c + d_r)
    k = torch.cat([ckv, k_rope], dim=-1)[:, :, None, :]  # (B, S_k, 1, d_c + d_r)
    return attention_ref(q, k, ckv[:, :, None, :], k_valid, scale)


def _check_mla(q_nope, q_rope, ckv, k_rope, w_uk, w_uv) -> None:
    heads, d_nope, d_c = w_uk.shape
    if w_uv.ndim != 3 or w_uv.shape[0] != heads or w_uv.shape[2] != d_c:
        raise ValueError(f"w_uv must be [H={heads}, d_v, d_c={d_c}], got {tuple(w_uv.shape)}")
    if q_nope.shape[2:] != (heads, d_nope) or q_rope.shape[:3] != q_nope.shape[:3]:
        raise ValueError(
            f"q_nope {tuple(q_nope.shape)} / q_rope {tuple(q_rope.shape)} do not match w_uk {tuple(w_uk.shape)}"
        )
    if ckv.shape[-1] != d_c or k_rope.shape[-1] != q_rope.shape[-1]:
        raise ValueError(f"ckv {tuple(ckv.shape)} / k_rope {tuple(k_rope.shape)} do not match the head layout")


def mla_upprojected_ref(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    k_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA by up-projecting the latent to per-head K/V, then ordinary attention.

    Args:
        q_nope: [B, S_q, H, d_nope]; q_rope: [B, S_q, H, d_r] (rotated)
        ckv: [B, S_k, d_c]; k_rope: [B, S_k, d_r] (rotated)
        w_uk: [H, d_nope, d_c]; w_uv: [H, d_v, d_c]
        k_valid: [B, S_k] bool or None
    Returns:
        out: [B, S_q, H, d_v]; lse: [B, S_q, H] fp32.
    """
    _check_mla(q_nope, q_rope, ckv, k_rope, w_uk, w_uv)
    heads = w_uk.shape[0]
    ckv_f = ckv.float()
    if k_valid is not None:
        ckv_f = torch.where(k_valid[..., None], ckv_f, 0.0)
    # (B, S_k, d_c) x (H, d_nope, d_c) -> (B, S_k, H, d_nope)
    k_nope = torch.einsum("bkc,hnc->bkhn", ckv_f, w_uk.float())
    v = torch.einsum("bkc,hvc->bkhv", ckv_f, w_uv.float())
    k = torch.cat([k_nope, k_rope.float()[:, :, None, :].expand(-1, -1, heads, -1)], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1).float()
    scale = q.shape[-1] ** -0.5
    out, lse = attention_ref(q, k, v, k_valid, scale)
    return out.to(q_nope.dtype), lse


def mla_absorbed_ref(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    k_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA in absorbed form: same arguments and results as :func:`mla_upprojected_ref`."""
    _check_mla(q_nope, q_rope, ckv, k_rope, w_uk, w_uv)
    scale = (q_nope.shape[-1] + q_rope.shape[-1]) ** -0.5
    # (B, S_q, H, d_nope) x (H, d_nope, d_c) -> (B, S_q, H, d_c)
    q_lat = torch.einsum("bqhn,hnc->bqhc", q_nope.float(), w_uk.float())
    o_lat, lse = latent_attention_ref(q_lat, q_rope.float(), ckv.float(), k_rope.float(), k_valid, scale)
    # (B, S_q, H, d_c) x (H, d_v, d_c) -> (B, S_q, H, d_v)
    out = torch.einsum("bqhc,hvc->bqhv", o_lat, w_uv.float())
    return out.to(q_nope.dtype), lse
