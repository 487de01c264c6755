"""The training forward of the causal video DiT: a whole inference-shaped context in one masked pass.

At inference the context's rows come from earlier passes at sigma = 0 and sit in the latent cache;
here the clean context frames and the noisy target chunk go through the same weights together, each
token with its own noise level (0 for context, sigma for the target), and a frame-level mask says
which frames each frame attends to (see ``world_data``). Attention is the MLA module's up-projected
form written with ``scaled_dot_product_attention``: the same scores and values as the absorbed form
the generator uses, with gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.rope import Rope3D, apply_rope
from workers.models.tiny.attention import MLAttention
from workers.models.tiny.layers import patchify, timestep_embedding, unpatchify
from workers.models.tiny.model import CausalVideoDiT


def rope_tables(rope: Rope3D, grid: tuple[int, int], tids: torch.Tensor, poses: torch.Tensor):
    """cos/sin [B, L*T, pairs] for frames with temporal ids [B, L] and camera poses [B, L, 2]."""
    b = tids.shape[0]
    # (B*L*T, pairs) -> (B, L*T, pairs)
    ang = rope.frame_angles(tids.reshape(-1), *grid, poses.reshape(-1, 2)).reshape(b, -1, rope.dim // 2)
    return torch.cos(ang).float(), torch.sin(ang).float()


def mla_masked(attn: MLAttention, h: torch.Tensor, cos, sin, mask: torch.Tensor) -> torch.Tensor:
    """MLA self-attention over a whole sample with a token mask. h: [B, S, dim]; mask: [B, S, S] bool."""
    b, s, _ = h.shape
    heads = attn.heads
    # (B, S, H*(d_nope + d_r)) -> (B, S, H, d_nope + d_r)
    q = attn.q_proj(h).reshape(b, s, heads, attn.d_nope + attn.d_r)
    q_nope, q_rope = q.split([attn.d_nope, attn.d_r], dim=-1)
    ckv, k_rope = attn.kv_down(h).split([attn.d_c, attn.d_r], dim=-1)  # (B, S, d_c), (B, S, d_r)
    ckv = attn.kv_norm(ckv)
    q_rope = apply_rope(q_rope, cos[:, :, None, :], sin[:, :, None, :])
    k_rope = apply_rope(k_rope, cos, sin)
    k_nope = torch.einsum("bsc,hnc->bhsn", ckv, attn.w_uk)  # (B, H, S, d_nope)
    v = torch.einsum("bsc,hvc->bhsv", ckv, attn.w_uv)  # (B, H, S, d_v)
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, S, d_nope + d_r)
    k = torch.cat([k_nope, k_rope[:, None].expand(b, heads, s, attn.d_r)], dim=-1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=attn.scale)  # (B, H, S, d_v)
    return attn.out(o.transpose(1, 2).reshape(b, s, heads * attn.d_v))


def train_forward(
    model: CausalVideoDiT,
    rope: Rope3D,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor,
    actions: torch.Tensor,
    temporal_ids: torch.Tensor,
    poses: torch.Tensor,
    frame_vis: torch.Tensor,
    out_frames: torch.Tensor,
) -> torch.Tensor:
    """Velocity of the frames selected by ``out_frames``.

    Args:
        x: [B, L, C, H, W] latents (clean context frames, noisy target frames).
        sigma: [B, L] per-frame noise level (0 for context).
        cond: [B, cond_dim] stream vectors.
        actions: [B, L, action_dim]; temporal_ids: [B, L]; poses: [B, L, 2] (patches).
        frame_vis: [B, L, L] bool, frame l attends to frame m.
        out_frames: [L] bool, which frames' velocity to return.
    Returns:
        [B, n_out, C, H, W] velocity.
    """
    cfg = model.cfg
    if cfg.attention != "mla":
        raise ValueError("train_forward trains the MLA model (the latent cache is what ships)")
    b, n_f = x.shape[:2]
    t_f, dim = cfg.tokens_per_frame, cfg.dim
    tok = model.patch_embed(patchify(x, cfg.patch))  # (B, L*T, dim)
    act = model.action_embed(actions)  # (B, L, dim)
    tok = tok + act[:, :, None, :].expand(b, n_f, t_f, dim).reshape(b, n_f * t_f, dim)
    t_in = timestep_embedding(sigma.reshape(-1), dim)  # (B*L, dim)
    t_emb = model.time_embed(t_in).reshape(b, n_f, dim) + model.cond_embed(cond)[:, None, :]
    e = model.time_proj(t_emb).reshape(b, n_f, 1, 6, dim)  # (B, L, 6*dim) -> (B, L, 1, 6, dim)
    cos, sin = rope_tables(rope, cfg.grid, temporal_ids.cpu(), poses.cpu())  # float64 angles on the CPU
    cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
    mask = frame_vis.repeat_interleave(t_f, 1).repeat_interleave(t_f, 2)  # (B, L*T, L*T)

    def per_token(v: torch.Tensor) -> torch.Tensor:  # (B, L, 1, dim) -> (B, L*T, dim)
        return v.expand(b, n_f, t_f, dim).reshape(b, n_f * t_f, dim)

    for blk in model.blocks:
        mods = (blk.modulation[:, None, None] + e).unbind(3)  # six (B, L, 1, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = (per_token(m) for m in mods)
        h = blk.norm1(tok) * (1 + scale1) + shift1
        tok = tok + gate1 * mla_masked(blk.attn, h, cos, sin, mask)
        h = blk.norm2(tok) * (1 + scale2) + shift2
        tok = tok + gate2 * blk.ffn(h)
    # the head only for the frames asked for
    n_out = int(out_frames.sum())
    tok = tok.reshape(b, n_f, t_f, dim)[:, out_frames]  # (B, n_out, T, dim)
    shift, scale = (model.head_modulation[:, None] + t_emb[:, out_frames, None, :]).unbind(2)  # (B, n_out, dim)
    h = model.head_norm(tok) * (1 + scale[:, :, None]) + shift[:, :, None]
    out = model.head(h.reshape(b, n_out * t_f, dim))
    return unpatchify(out, n_out, cfg.latent_channels, cfg.latent_height, cfg.latent_width, cfg.patch)
