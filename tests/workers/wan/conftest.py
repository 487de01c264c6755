"""Tiny Wan2.1 models and fake checkpoints in every layout ``--weights`` accepts, built from one random model.

Importable by other tests: ``from tests.workers.wan.conftest import tiny_wan_config, random_wan``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from workers.models.wan.keys import diffusers_to_original


def tiny_wan_config(**overrides) -> dict:
    """REAL_MODELS.md's tiny diffusers WanTransformer3DModel config (about 20k parameters)."""
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ) | overrides  # fmt: skip


def random_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A tiny WanTransformer3DModel with EVERY parameter random (Wan zero-initialises some), eval mode."""
    model = WanTransformer3DModel(**tiny_wan_config(**overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def original_wan_config(cfg: dict) -> dict:
    """The original Wan repository's config.json of a diffusers config (what Wan-AI/Wan2.1-T2V-1.3B ships)."""
    return {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "text_len": 512,
        "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"], "num_heads": cfg["num_attention_heads"],
        "in_dim": cfg["in_channels"], "out_dim": cfg["out_channels"], "ffn_dim": cfg["ffn_dim"],
        "freq_dim": cfg["freq_dim"], "num_layers": cfg["num_layers"], "eps": 1e-06,
        "text_dim": cfg["text_dim"],  # Wan's own file has none (4096 then); the tiny model's is 16
    }  # fmt: skip


def save_original_folder(model: WanTransformer3DModel, root: Path) -> Path:
    """A folder as `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B` leaves it (encoder / VAE files are stubs)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(original_wan_config(dict(model.config))))
    save_file(diffusers_to_original(model.state_dict()), str(root / "diffusion_pytorch_model.safetensors"))
    (root / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"stub")
    (root / "Wan2.1_VAE.pth").write_bytes(b"stub")
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    return root


def save_pipeline_folder(model: WanTransformer3DModel, root: Path) -> Path:
    """A diffusers WanPipeline folder (the text encoder, tokenizer and VAE folders are empty stubs)."""
    root.mkdir(parents=True)
    index = {
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    }  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    model.save_pretrained(root / "transformer")
    for part in ("text_encoder", "tokenizer", "vae"):
        (root / part).mkdir()
    return root


def training_checkpoint(model: WanTransformer3DModel, fsdp: bool = False) -> dict[str, torch.Tensor]:
    """The generator state dict of a Self-Forcing / CausVid / LongLive run: original names behind ``model.``
    (LongLive's FSDP adds ``_fsdp_wrapped_module.`` to the wrapper and to every block)."""
    out = {}
    for k, v in diffusers_to_original(model.state_dict()).items():
        if fsdp:
            k = "_fsdp_wrapped_module." + k
            if k.startswith("_fsdp_wrapped_module.blocks."):
                i, rest = k[len("_fsdp_wrapped_module.blocks.") :].split(".", 1)
                k = f"_fsdp_wrapped_module.blocks.{i}._fsdp_wrapped_module.{rest}"
        out[f"model.{k}"] = v.clone()
    return out


@dataclass(frozen=True)
class WanFiles:
    """One random tiny model (``sd``: its diffusers state dict) saved in every accepted layout."""

    sd: dict[str, torch.Tensor]
    config: dict  # tiny_wan_config()
    diffusers: Path  # save_pretrained folder
    sharded: Path  # save_pretrained folder in several shards with an index
    pipeline: Path
    original: Path
    self_forcing: Path  # {"generator": other model, "critic": foreign keys, "generator_ema": sd}
    self_forcing_generator_sd: dict[str, torch.Tensor]  # what its "generator" holds, in diffusers names
    causvid: Path  # {"generator": sd}
    flat_pt: Path  # sd in original names, no prefix, no wrapper dict
    flat_safetensors: Path  # sd in diffusers names


@pytest.fixture(scope="session")
def wan_files(tmp_path_factory) -> WanFiles:
    root = tmp_path_factory.mktemp("wan")
    model, other = random_wan(0), random_wan(1)
    model.save_pretrained(root / "diffusers")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    critic = {f"critic.layer{i}.weight": torch.randn(3, 3) for i in range(3)}
    torch.save(
        {"generator": training_checkpoint(other), "critic": critic, "generator_ema": training_checkpoint(model)},
        root / "self_forcing_dmd.pt",
    )
    torch.save({"generator": training_checkpoint(model)}, root / "causvid.pt")
    torch.save(diffusers_to_original(model.state_dict()), root / "flat.pt")
    save_file(model.state_dict(), str(root / "flat.safetensors"))
    return WanFiles(
        sd={k: v.clone() for k, v in model.state_dict().items()},
        config=tiny_wan_config(),
        diffusers=root / "diffusers",
        sharded=root / "sharded",
        pipeline=save_pipeline_folder(model, root / "pipeline"),
        original=save_original_folder(model, root / "Wan2.1-T2V-tiny"),
        self_forcing=root / "self_forcing_dmd.pt",
        self_forcing_generator_sd={k: v.clone() for k, v in other.state_dict().items()},
        causvid=root / "causvid.pt",
        flat_pt=root / "flat.pt",
        flat_safetensors=root / "flat.safetensors",
    )
