"""Chunk-causal Wan2.1 on diffusers' own modules: ``WanTransformer3DModel`` with longroll's attention processors.

The parameters are diffusers' (same names, so diffusers-format weights load with ``strict=True``);
only the attention processors and the outer forward are longroll's:

    noisy chunk (B, F, C, H, W) --Conv3d patch embedding--> tokens (B, F*h*w, dim)
    timestep t = 1000 * sigma per stream --sinusoid, MLP--> temb (B, dim), modulation (B, 6, dim)
    N x diffusers WanTransformerBlock:
        self-attention  (CacheSelfAttnProcessor): q/k RMSNorm across heads; keys and values of the
                        stream's cache rows [sink | memory | window] then the chunk; RoPE applied on
                        read with the position policy's frame ids (adjacent-pair layout, as Wan)
        cross-attention (TextCrossAttnProcessor): over the stream's 512 text tokens, whose K/V are
                        computed once per stream and prompt
        FFN, all with the block's modulation table
    norm_out + modulation -> proj_out -> unpatchify -> velocity (B, F, C, H, W)

The cache rows of a token are ``[k (H*D) | v (H*D)]`` with k after the RMSNorm and before RoPE,
so absolute and relative position policies both work on the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from ops.rope import apply_rope_interleaved
from workers.attention import StreamContext, cached_mha
from workers.config import ModelConfig

# diffusers keeps these in fp32 when it loads a model in bf16; so do we
FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def transformer_config(cfg: ModelConfig) -> dict:
    """diffusers ``WanTransformer3DModel`` config of a longroll ModelConfig."""
    return dict(
        patch_size=(1, cfg.patch, cfg.patch),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        text_dim=cfg.cond_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_hidden,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.norm_eps,
    )


@dataclass
class StreamText:
    """One stream's text conditioning inside the model: embedded tokens and per-layer cross-attention K/V."""

    source: torch.Tensor  # the state's cond tensor these were computed from (recomputed when it changes)
    tokens: torch.Tensor  # [1, text_len, dim] after the text embedder
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> k, v [1, L, H, D]


@dataclass
class TextBatch:
    """What the cross-attention processors receive in place of ``encoder_hidden_states``."""

    streams: list[StreamText]


@dataclass
class ChunkCall:
    """What the self-attention processors receive in place of ``rotary_emb``: one context per batch row."""

    ctxs: list[StreamContext]


class CacheSelfAttnProcessor:
    """attn1 of one block: chunk queries over the stream's cached rows and the chunk itself."""

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(rotary_emb, ChunkCall):
            raise TypeError("CacheSelfAttnProcessor runs inside WanChunkModel.forward only")
        b, s, _ = hidden_states.shape
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, S, dim) -> (B, S, H, D)
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        out = cached_mha(q, k, v, self.layer, rotary_emb.ctxs, apply_rope_interleaved)
        out = out.flatten(2, 3).type_as(q)  # (B, S, H, D) -> (B, S, H*D)
        return attn.to_out[1](attn.to_out[0](out))


class TextCrossAttnProcessor:
    """attn2 of one block: chunk queries over each stream's text tokens, K/V computed once per stream."""

    def __init__(self, layer: int):
        self.layer = layer

    def _kv(self, attn, text: StreamText) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer not in text.kv:
            k = attn.norm_k(attn.to_k(text.tokens)).unflatten(2, (attn.heads, -1))  # (1, L, H, D)
            v = attn.to_v(text.tokens).unflatten(2, (attn.heads, -1))
            text.kv[self.layer] = (k, v)
        return text.kv[self.layer]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(encoder_hidden_states, TextBatch):
            raise TypeError("TextCrossAttnProcessor runs inside WanChunkModel.forward only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        kv = [self._kv(attn, t) for t in encoder_hidden_states.streams]
        k = torch.cat([k for k, _ in kv])  # (B, L, H, D)
        v = torch.cat([v for _, v in kv])
        # (B, S, H, D) -> (B, H, S, D) for SDPA, and back
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class WanChunkModel(torch.nn.Module):
    """Wan2.1 transformer that denoises one chunk per call against a stream's KV cache.

    ``self.transformer`` is a plain diffusers ``WanTransformer3DModel``: its ``state_dict`` is the
    diffusers checkpoint layout, and its own ``forward`` stays usable (with diffusers' processors).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = WanTransformer3DModel(**transformer_config(cfg))
        for layer, block in enumerate(self.transformer.blocks):
            block.attn1.set_processor(CacheSelfAttnProcessor(layer))
            block.attn2.set_processor(TextCrossAttnProcessor(layer))

    def rebuild_buffers(self) -> WanChunkModel:
        """Real rotary tables after a build on the meta device (the weights hold none; our forward does not
        read them, but diffusers' own forward and ``.to()`` do)."""
        m = self.transformer
        m.rope = WanRotaryPosEmbed(m.config.attention_head_dim, m.config.patch_size, m.config.rope_max_seq_len)
        return self

    def keep_fp32(self) -> WanChunkModel:
        """Cast the modules diffusers keeps in fp32 back to fp32 (after a ``.to(bf16)``)."""
        for name, module in self.transformer.named_modules():
            if name.split(".")[-1] in FP32_MODULES:
                module.float()
        for name, p in self.transformer.named_parameters():
            if name.split(".")[-1] in FP32_MODULES:
                p.data = p.data.float()
        return self

    def embed_text(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """[text_len, text_dim] zero-padded prompt embeddings -> [1, text_len, dim] text tokens."""
        emb = self.transformer.condition_embedder.text_embedder
        dtype = next(emb.parameters()).dtype
        return emb(prompt_embeds[None].to(dtype))

    def time_embedding(self, sigma: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels [B] -> temb [B, dim] and block modulation [B, 6, dim].

        One stream at a time: a CPU GEMM over 1 row takes another path than over B rows, and a
        stream's results must not depend on which streams share its batch.
        """
        ce = self.transformer.condition_embedder
        temb, proj = [], []
        for t in (sigma.float() * 1000.0).split(1):  # Wan's timesteps: t = 1000 * sigma
            freq = ce.timesteps_proj(t)
            te = ce.time_embedder(freq.to(next(ce.time_embedder.parameters()).dtype)).to(dtype)
            temb.append(te)
            proj.append(ce.time_proj(ce.act_fn(te)))
        return torch.cat(temb), torch.cat(proj).unflatten(1, (6, -1))  # (B, 6*dim) -> (B, 6, dim)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        texts: Sequence[StreamText],
        ctxs: list[StreamContext],
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """Velocity of a chunk.

        Args:
            x: [B, F, C, H, W] noisy latents of the chunk (F latent frames).
            sigma: [B] noise levels in [0, 1] (0: the re-cache pass of the clean chunk).
            texts: per row, the stream's text tokens and cross-attention K/V store.
            ctxs: per row, the stream's cache, rotary tables and (re-cache pass) append plan.
            need_output: False on the re-cache pass, which only writes the cache rows.
        Returns:
            [B, F, C, H, W] velocity, or None.
        """
        m = self.transformer
        b, f, c, h, w = x.shape
        p = self.cfg.patch
        # (B, F, C, H, W) -> (B, C, F, H, W) -> (B, dim, F, h, w) -> (B, F*h*w, dim); one stream at a time:
        # a CPU Conv3d's result for one sample depends on the batch it is in
        vid = x.permute(0, 2, 1, 3, 4).to(m.patch_embedding.weight.dtype)
        tok = torch.cat([m.patch_embedding(vid[i : i + 1]) for i in range(b)])
        tok = tok.flatten(2).transpose(1, 2).contiguous()
        temb, proj = self.time_embedding(sigma, tok.dtype)
        call, text = ChunkCall(ctxs), TextBatch(list(texts))
        for block in m.blocks:
            tok = block(tok, text, proj, call)
        if not need_output:
            return None
        # (1, 2, dim) + (B, 1, dim) -> shift, scale (B, 1, dim)
        shift, scale = (m.scale_shift_table + temb[:, None, :]).chunk(2, dim=1)
        out = (m.norm_out(tok.float()) * (1 + scale) + shift).type_as(tok)
        out = m.proj_out(out)  # (B, F*h*w, p*p*C)
        # (B, F*h*w, p*p*C) -> (B, F, h, w, 1, p, p, C) -> (B, C, F, 1, h, p, w, p) -> (B, C, F, H, W)
        out = out.reshape(b, f, h // p, w // p, 1, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) -> (B, F, C, H, W)
