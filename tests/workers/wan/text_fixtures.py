"""Tiny umT5 parts for tests: a T5 (Unigram) tokenizer and a randomised UMT5EncoderModel, built locally.

Nothing is downloaded. The tokenizer is a hand-made Unigram vocabulary (specials, a few whole words,
single characters) wrapped as transformers' ``T5Tokenizer``; the encoder has every parameter random
(layer norms around 1) so that a wrong key, mask or cast cannot pass by accident.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

TINY_D_MODEL = 16  # width of the tiny encoder's outputs (its "text_dim")
_WORDS = ["a", "the", "cat", "dog", "walks", "on", "beach", "at", "sunset", "red", "car", "city", "night"]
_EXTRA_IDS = 2  # sentinel tokens, as umT5's tokenizer has (it has 300)


def tiny_umt5_config(vocab_size: int) -> UMT5Config:
    """The tiny encoder's config (REAL_MODELS.md "Tiny configs")."""
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_D_MODEL,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )


def make_tiny_tokenizer() -> T5Tokenizer:
    """A T5 Unigram tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, appends ``</s>``, pads on the right."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in _WORDS]  # whole words win over their letters
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [(f"▁{c}", -5.5) for c in string.ascii_lowercase]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=_EXTRA_IDS)


def make_tiny_encoder(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    """A tiny UMT5EncoderModel with every parameter randomised (seeded), in eval mode."""
    model = UMT5EncoderModel(tiny_umt5_config(vocab_size))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "layer_norm" in name else 0.5 * noise)
    return model.eval()


def make_tiny_text_parts(tmp_path: Path, seed: int = 0) -> tuple[str, str]:
    """Save a tiny tokenizer and encoder under ``tmp_path``; returns ``(encoder_dir, tokenizer_dir)``."""
    tok_dir, enc_dir = Path(tmp_path) / "tokenizer", Path(tmp_path) / "text_encoder"
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tok_dir)
    make_tiny_encoder(len(tokenizer), seed).save_pretrained(enc_dir)
    return str(enc_dir), str(tok_dir)


# HF -> Wan, written out independently of text.py's Wan -> HF table (inverse direction).
_HF_TO_WAN = [
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
]


def hf_to_wan_keys(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UMT5EncoderModel state dict in Wan2.1's own T5Encoder names (what models_t5_umt5-xxl-enc-bf16.pth holds)."""
    out = {}
    for key, value in hf_sd.items():
        if key == "encoder.embed_tokens.weight":  # tied to shared.weight; Wan stores it once
            continue
        names = [re.sub(p, r, key) for p, r in _HF_TO_WAN if re.fullmatch(p, key)]
        assert len(names) == 1, key
        out[names[0]] = value.clone()
    return out
