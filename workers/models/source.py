"""Where a generator's model comes from: one typed value that travels from the CLI to every worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSource:
    """The weights options of a run or a `generate`, resolved on each worker inside its own installation.

    tiny: ``weights`` is "shipped", "random"/None or a safetensors file (workers.weights.resolve).
    wan: ``weights`` is a diffusers transformer or pipeline folder, an original Wan2.1 folder, a
    Self-Forcing / CausVid / LongLive ``.pt`` or a converted ``.safetensors`` (None: seeded random init).
    """

    weights: str | None = None  # see above
    base: str | None = None  # wan: folder whose config.json gives a bare .pt its shapes
    lora: str | None = None  # wan: LongLive LoRA file, merged into the weights at load
    ema: bool = True  # wan: a Self-Forcing .pt's generator_ema (else generator)
    prompt_embeds: str | None = None  # wan: safetensors with `prompt_embeds` [L, text_dim]; skips the encoder
    text_encoder: str | None = None  # wan: folder with text_encoder/ + tokenizer/ when the weights have none
    vae: str | None = None  # wan: Wan2.1 VAE (diffusers vae/ or pipeline folder, Wan2.1_VAE.pth): decode to video

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ModelSource:
        return cls(**(d or {}))
