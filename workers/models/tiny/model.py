"""A small Wan-like causal video DiT that denoises one chunk of latent frames at a time.

    noisy chunk (B, F, C, H, W) --patchify--> tokens (B, F*h*w, dim)
        + per-frame action embedding
    N x [ AdaLN -> self-attention over (sink | memory | window | chunk) -> gate
          AdaLN -> FFN -> gate ]              AdaLN conditioned on (noise level + stream vector)
    AdaLN -> linear -> unpatchify -> velocity (B, F, C, H, W)

Attention is chunk-causal: the chunk sees itself fully and its stream's cached past, never the
future. Text cross-attention of Wan is replaced by the per-stream conditioning vector in AdaLN.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.models.tiny.attention import MHAttention, MLAttention
from workers.models.tiny.layers import FeedForward, modulate, patchify, timestep_embedding, unpatchify


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mla_form: str = "absorbed"):
        super().__init__()
        eps = 1e-6
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=eps)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=eps)
        self.attn = MLAttention(cfg, mla_form) if cfg.attention == "mla" else MHAttention(cfg)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) * cfg.dim**-0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, layer: int, ctxs: list[StreamContext]) -> torch.Tensor:
        # e: (B, 6, dim) -> six (B, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), layer, ctxs)
        return x + gate2[:, None] * self.ffn(modulate(self.norm2(x), shift2, scale2))


class CausalVideoDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, mla_form: str = "absorbed"):
        super().__init__()
        self.cfg = cfg
        p, c = cfg.patch, cfg.latent_channels
        self.patch_embed = nn.Linear(p * p * c, cfg.dim)
        self.action_embed = nn.Linear(cfg.action_dim, cfg.dim)
        self.time_embed = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.cond_embed = nn.Linear(cfg.cond_dim, cfg.dim)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, mla_form) for _ in range(cfg.num_layers))
        self.head_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) * cfg.dim**-0.5)
        self.head = nn.Linear(cfg.dim, p * p * c)

    def conditioning(self, sigma: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise level, stream vector) -> t_emb [B, dim] and AdaLN inputs e [B, 6, dim].

        Computed one stream at a time: a CPU GEMM with 1 row takes another code path than one with
        B rows, and results would then depend on which streams share a batch.
        """
        dim = self.cfg.dim
        t_in = timestep_embedding(sigma, dim).to(cond.dtype)
        t_emb = torch.cat(
            [self.time_embed(t_in[i : i + 1]) + self.cond_embed(cond[i : i + 1]) for i in range(len(cond))]
        )
        e = torch.cat([self.time_proj(t_emb[i : i + 1]) for i in range(len(cond))])
        return t_emb, e.reshape(-1, 6, dim)  # (B, 6*dim) -> (B, 6, dim)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: torch.Tensor,
        actions: torch.Tensor,
        ctxs: list[StreamContext],
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """Predict the flow-matching velocity of a chunk.

        Args:
            x: [B, F, C, H, W] noisy latents of the chunk.
            sigma: [B] noise level in [0, 1] (0 = clean; the re-cache pass).
            cond: [B, cond_dim] per-stream conditioning vector.
            actions: [B, F, action_dim] per-frame actions (zeros when unused).
            ctxs: one StreamContext per batch row.
            need_output: False on the re-cache pass, which only writes the cache.
        Returns:
            [B, F, C, H, W] velocity, or None when ``need_output`` is False.
        """
        cfg = self.cfg
        b, f = x.shape[:2]
        tok = self.patch_embed(patchify(x, cfg.patch))  # (B, F*h*w, dim)
        # (B, F, dim) -> (B, F, 1, dim) -> (B, F*h*w, dim): one action per frame, broadcast over its tokens
        act = self.action_embed(actions)[:, :, None, :].expand(b, f, cfg.tokens_per_frame, cfg.dim)
        tok = tok + act.reshape(b, f * cfg.tokens_per_frame, cfg.dim)
        t_emb, e = self.conditioning(sigma, cond)
        for layer, block in enumerate(self.blocks):
            tok = block(tok, e, layer, ctxs)
        if not need_output:
            return None
        shift, scale = (self.head_modulation + t_emb[:, None, :]).unbind(1)
        out = self.head(modulate(self.head_norm(tok), shift, scale))
        return unpatchify(out, f, cfg.latent_channels, cfg.latent_height, cfg.latent_width, cfg.patch)
