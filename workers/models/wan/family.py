"""The wan family: Wan2.1 weights (Self-Forcing / CausVid / LongLive / diffusers / original) in the rollout core.

Conditioning of a stream is its prompt's umT5 embeddings ``[L, text_dim]`` (unpadded, float32),
from ``--prompt-embeds`` or the text encoder found beside the weights; it goes into the stream's
checkpoint, so a resumed stream needs no encoder. Inside the model each stream's embeddings are
zero-padded to ``text_len``, embedded and turned into per-layer cross-attention K/V once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import structlog
import torch

from ops.rope import apply_rope_interleaved
from workers.attention import StreamContext
from workers.config import ModelConfig
from workers.models.source import ModelSource
from workers.models.wan.model import StreamText, WanChunkModel
from workers.types import StreamSpec

log = structlog.get_logger(__name__)

RANDOM_PROMPT_TOKENS = 16  # random-init models without a text encoder: a seeded stand-in prompt of this length


def config_for_weights(cfg: ModelConfig, transformer_cfg: dict | None) -> ModelConfig:
    """The preset's rollout with the shapes of the weights' own diffusers config (when they carry one).

    Raises:
        ValueError: a config longroll cannot run (3-D patches, image conditioning, ...).
    """
    if not transformer_cfg:
        return cfg
    c = transformer_cfg
    patch = tuple(c.get("patch_size", (1, 2, 2)))
    if len(patch) != 3 or patch[0] != 1 or patch[1] != patch[2]:
        raise ValueError(f"patch_size {patch} is not supported (need (1, p, p))")
    if c.get("image_dim") or c.get("added_kv_proj_dim"):
        raise ValueError("image-conditioned Wan (I2V) weights are not supported; use a T2V model")
    if c.get("in_channels", 16) != (c.get("out_channels") or c.get("in_channels", 16)):
        raise ValueError(f"in_channels {c.get('in_channels')} != out_channels {c.get('out_channels')}")
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    return replace(
        cfg,
        latent_channels=int(c.get("in_channels", 16)),
        patch=int(patch[1]),
        dim=heads * head_dim,
        num_heads=heads,
        num_layers=int(c["num_layers"]),
        ffn_dim=int(c["ffn_dim"]),
        cond_dim=int(c.get("text_dim", 4096)),
        freq_dim=int(c.get("freq_dim", 256)),
        cross_attn_norm=bool(c.get("cross_attn_norm", True)),
        norm_eps=float(c.get("eps", 1e-6)),
    )


def random_prompt_embeds(prompt: str, text_dim: int) -> torch.Tensor:
    """A seeded stand-in for a prompt's embeddings [RANDOM_PROMPT_TOKENS, text_dim] (random-init models only)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randn(RANDOM_PROMPT_TOKENS, text_dim, generator=torch.Generator().manual_seed(seed))


class WanFamily:
    rotate = staticmethod(apply_rope_interleaved)  # Wan rotates adjacent pairs

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, source: ModelSource):
        self.cfg, self.device, self.dtype, self.source = cfg, device, dtype, source
        self.weights_sha = None
        self.parts = None  # the resolved WanSource (text encoder / tokenizer / vae folders)
        if source.weights is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.init_seed)
                model = WanChunkModel(cfg)
        else:
            from workers.models.wan.weights import check_keys, load_state_dict, resolve_source, weights_digest

            self.parts = resolve_source(source.weights, source.base, source.lora)
            sd = load_state_dict(self.parts, ema=source.ema)
            with torch.device("meta"):  # no random init of 1.4 B parameters only to overwrite them (18 s on 2 cores)
                model = WanChunkModel(cfg)
            check_keys(sd, model.transformer.config)
            # own, aligned memory: tensors mmapped from a safetensors file may start at any 8-byte offset,
            # and CPU kernels then take other code paths (results not bit-identical to the same weights elsewhere)
            sd = {k: v.to(device=device, copy=True) for k, v in sd.items()}
            model.transformer.load_state_dict(sd, strict=True, assign=True)
            model.rebuild_buffers()
            self.weights_sha = weights_digest(self.parts, ema=source.ema)
        self.model = model.to(device, dtype).keep_fp32().eval().requires_grad_(False)
        self._texts: dict[str, StreamText] = {}
        self._encoder = None  # UMT5TextEncoder, loaded on the first prompt that needs it

    # ---- conditioning ------------------------------------------------------------------------
    def text_parts(self) -> tuple[str, str, str] | None:
        """("hf" | "original", encoder folder or .pth, tokenizer folder) of the umT5 encoder, or None."""
        from pathlib import Path

        if self.source.text_encoder is not None:
            root = Path(self.source.text_encoder)
            return "hf", str(root / "text_encoder"), str(root / "tokenizer")
        p = self.parts
        if p is not None and p.text_encoder_dir and p.tokenizer_dir:
            return "hf", p.text_encoder_dir, p.tokenizer_dir
        if p is not None and p.original_text_encoder and p.tokenizer_dir:  # the original Wan2.1 folder
            return "original", p.original_text_encoder, p.tokenizer_dir
        return None

    def conditioning(self, spec: StreamSpec) -> torch.Tensor:
        """The prompt's embeddings [L, text_dim], float32 on CPU."""
        from workers.models.wan.text import load_prompt_embeds

        if self.source.prompt_embeds is not None:
            return load_prompt_embeds(self.source.prompt_embeds, self.cfg.cond_dim, self.cfg.text_len)
        parts = self.text_parts()
        if parts is None:
            if self.source.weights is None:
                return random_prompt_embeds(spec.prompt, self.cfg.cond_dim)
            raise ValueError(
                "no umT5 text encoder beside these weights: pass --prompt-embeds FILE or --text-encoder DIR"
            )
        if self._encoder is None:  # on the model's device, in its dtype (bf16 presets: as Wan runs umT5)
            from workers.models.wan.text import UMT5TextEncoder

            kind, encoder, tokenizer = parts
            opts = dict(device=self.device, dtype=self.dtype, text_len=self.cfg.text_len)
            if kind == "original":
                self._encoder = UMT5TextEncoder.from_original(encoder, tokenizer, **opts)
            else:
                self._encoder = UMT5TextEncoder(encoder, tokenizer, **opts)
            log.info("text_encoder.loaded", kind=kind, encoder=encoder, device=str(self.device))
        emb = self._encoder.encode(spec.prompt)
        if emb.shape[-1] != self.cfg.cond_dim:
            raise ValueError(f"text encoder width {emb.shape[-1]} != the model's text_dim {self.cfg.cond_dim}")
        return emb

    def _text(self, state) -> StreamText:
        from workers.models.wan.text import pad_prompt_embeds

        text = self._texts.get(state.stream_id)
        if text is None or text.source is not state.cond:
            padded = pad_prompt_embeds(state.cond.float().cpu(), self.cfg.text_len).to(self.device)
            text = StreamText(state.cond, self.model.embed_text(padded))
            self._texts[state.stream_id] = text
        return text

    def forget(self, stream_id: str) -> None:
        self._texts.pop(stream_id, None)

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        states: Sequence,
        actions: torch.Tensor,
        ctxs: list[StreamContext],
        need_output: bool = True,
    ) -> torch.Tensor | None:
        del actions  # Wan takes no per-frame actions
        return self.model(x, sigma, [self._text(s) for s in states], ctxs, need_output)
