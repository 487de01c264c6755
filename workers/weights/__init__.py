"""Weights that ship with longroll, and how a weights option resolves to a file.

``world-tiny.safetensors`` is the tiny preset's world model (see ``MODEL_CARD.md`` beside it), trained
by ``longroll train-world`` on procedural worlds. It fits any ``--memory`` mode and cache dtype of the
tiny preset with the latent (MLA) cache; other architectures start from the seeded random init.

A weights option is ``"shipped"`` (the file above), ``"random"`` (the seeded random init) or the
path of a safetensors file of a ``CausalVideoDiT`` state dict. The name, not a path, travels to the
workers of a run, so every node resolves it inside its own installation.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = "shipped"
RANDOM = "random"
WORLD_TINY = Path(__file__).with_name("world-tiny.safetensors")

# fields that decide the parameters' shapes or what they mean: they must match the trained model
_ARCH_FIELDS = (
    "latent_channels", "latent_height", "latent_width", "patch", "dim", "num_layers", "num_heads", "ffn_mult",
    "cond_dim", "action_dim", "attention", "latent_dim", "rope_dim", "rope_theta", "frames_per_chunk", "sigmas",
)  # fmt: skip
_TRAINED = {
    "latent_channels": 3, "latent_height": 32, "latent_width": 32, "patch": 4, "dim": 128, "num_layers": 4,
    "num_heads": 4, "ffn_mult": 4, "cond_dim": 32, "action_dim": 2, "attention": "mla", "latent_dim": 64,
    "rope_dim": 32, "rope_theta": 100.0, "frames_per_chunk": 3, "sigmas": (1.0, 0.75, 0.5, 0.25),
}  # fmt: skip


def shipped_fits(cfg) -> bool:
    """True when the shipped world model's weights fit this ModelConfig."""
    return WORLD_TINY.is_file() and all(getattr(cfg, k) == _TRAINED[k] for k in _ARCH_FIELDS)


def default_weights(cfg) -> str:
    """``shipped`` when the shipped weights fit the config, else ``random``."""
    return SHIPPED if shipped_fits(cfg) else RANDOM


def resolve(weights: str | None, cfg) -> str | None:
    """A weights option -> a file path, or None for the random init.

    Raises:
        ValueError: ``shipped`` for a config the shipped weights do not fit, or a missing file.
    """
    if weights in (None, "", RANDOM):
        return None
    if weights == SHIPPED:
        if not shipped_fits(cfg):
            diff = [k for k in _ARCH_FIELDS if getattr(cfg, k) != _TRAINED[k]]
            why = "the file is missing" if not WORLD_TINY.is_file() else f"they differ in {', '.join(diff)}"
            raise ValueError(f"the shipped weights do not fit this model ({why}); use --weights random")
        return str(WORLD_TINY)
    path = Path(weights)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"weights file not found (or not .safetensors): {weights}")
    return str(path)
