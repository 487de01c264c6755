"""The tiny family's self-attention modules: MHA baseline and the MLA latent cache (VideoMLA).

Both take the batch of chunk tokens ``x: [B, S, dim]`` and one StreamContext per stream
(workers/attention.py); the MHA module reads and writes rows through :func:`workers.attention.cached_mha`.
"""

from __future__ import annotations

import torch
from torch import nn

from ops import dispatch
from ops.rope import apply_rope
from workers.attention import StreamContext, cached_mha
from workers.config import ModelConfig
from workers.models.tiny.layers import RMSNorm


class MHAttention(nn.Module):
    """Per-head K/V cache: a row stores [k (H*D) | v (H*D)], k unrotated."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, layer: int, ctxs: list[StreamContext]) -> torch.Tensor:
        b, s, dim = x.shape
        # (B, S, 3*dim) -> (B, S, 3, H, D)
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        # (B, S, H, D) -> (B, S, dim)
        return self.out(cached_mha(q, k, v, layer, ctxs, apply_rope).reshape(b, s, dim))


class MLAttention(nn.Module):
    """Low-rank latent cache: a row stores [c_kv (d_c) | k_rope (d_r)], k_rope unrotated.

    ``form="absorbed"`` attends in latent space (W_UK folded into queries, W_UV into the output);
    ``form="upprojected"`` materialises per-head K/V from the latent first. Same result.
    """

    def __init__(self, cfg: ModelConfig, form: str = "absorbed"):
        super().__init__()
        self.heads, self.d_nope, self.d_v = cfg.num_heads, cfg.head_dim, cfg.head_dim
        self.d_c, self.d_r = cfg.latent_dim, cfg.rope_dim
        self.form = form
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * (self.d_nope + self.d_r))
        self.kv_down = nn.Linear(cfg.dim, self.d_c + self.d_r)  # -> [c_kv | k_rope]
        self.kv_norm = RMSNorm(self.d_c)
        std = self.d_c**-0.5
        self.w_uk = nn.Parameter(torch.randn(self.heads, self.d_nope, self.d_c) * std)
        self.w_uv = nn.Parameter(torch.randn(self.heads, self.d_v, self.d_c) * std)
        self.out = nn.Linear(cfg.num_heads * self.d_v, cfg.dim)
        self.scale = (self.d_nope + self.d_r) ** -0.5
        self.sparse = cfg.memory == "sparse"
        self.sparse_args = dict(top_k=cfg.sparse_top_k, block_size=cfg.sparse_block, q_group=cfg.sparse_q_group)

    def forward(self, x: torch.Tensor, layer: int, ctxs: list[StreamContext]) -> torch.Tensor:
        b, s, _ = x.shape
        # (B, S, H*(d_nope + d_r)) -> (B, S, H, d_nope + d_r)
        q = self.q_proj(x).reshape(b, s, self.heads, self.d_nope + self.d_r)
        q_nope, q_rope = q.split([self.d_nope, self.d_r], dim=-1)
        ckv, k_rope = self.kv_down(x).split([self.d_c, self.d_r], dim=-1)  # (B, S, d_c), (B, S, d_r)
        ckv = self.kv_norm(ckv)
        if self.form == "absorbed":
            # (B, S, H, d_nope) x (H, d_nope, d_c) -> (B, S, H, d_c)
            q_lat = torch.einsum("bshn,hnc->bshc", q_nope, self.w_uk)
        outs = []
        for i, ctx in enumerate(ctxs):
            rows, _ = ctx.cache.read(layer, x.dtype, ctx.slots)  # (S_ctx, d_c + d_r)
            c_all = torch.cat([rows[:, : self.d_c], ckv[i]], dim=0)  # (S_ctx + S, d_c)
            r_all = torch.cat([rows[:, self.d_c :], k_rope[i]], dim=0)  # (S_ctx + S, d_r)
            r_rot = apply_rope(r_all, ctx.k_cos, ctx.k_sin)
            qr_rot = apply_rope(q_rope[i], ctx.q_cos[:, None, :], ctx.q_sin[:, None, :])
            if self.sparse:
                n = rows.shape[0]
                # OmniMem: each head reads its top-k history blocks + the sink + the local window + the chunk
                o_lat, _ = dispatch.sparse_latent(
                    q_lat[i], qr_rot, c_all[:n], r_rot[:n], self.scale, ckv_new=c_all[n:], k_rope_new=r_rot[n:],
                    sink_len=ctx.sink_tokens, window_start=ctx.window_start, **self.sparse_args,
                )  # fmt: skip
                outs.append(torch.einsum("shc,hvc->shv", o_lat.to(x.dtype), self.w_uv))
            elif self.form == "absorbed":
                o_lat = dispatch.latent(q_lat[i], qr_rot, c_all, r_rot, self.scale)  # (S, H, d_c)
                outs.append(torch.einsum("shc,hvc->shv", o_lat, self.w_uv))
            else:
                # (S_k, d_c) x (H, d_nope, d_c) -> (S_k, H, d_nope)
                k_nope = torch.einsum("kc,hnc->khn", c_all, self.w_uk)
                v = torch.einsum("kc,hvc->khv", c_all, self.w_uv)
                k = torch.cat([k_nope, r_rot[:, None, :].expand(-1, self.heads, -1)], dim=-1)
                outs.append(dispatch.mha(torch.cat([q_nope[i], qr_rot], dim=-1), k, v, self.scale))
            if ctx.plan is not None:
                ctx.cache.write_slots(layer, ctx.plan.slots, torch.cat([ckv[i], k_rope[i]], dim=-1))
        # (B, S, H, d_v) -> (B, S, H*d_v)
        return self.out(torch.stack(outs).reshape(b, s, -1))
