"""Pieces shared by the subcommands: the one-line-error parser, model options, bad-input errors."""

from __future__ import annotations

import argparse
import sys

from workers.config import MEMORY_MODES, PRESETS, ModelConfig


class UsageError(ValueError):
    """Bad input: reported as one `error: ...` line with exit code 2, before anything is written."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + two lines otherwise)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_model_options(p: argparse.ArgumentParser, memory: bool = True) -> None:
    p.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--attention", choices=["mha", "mla"], default=None, help="KV cache kind (default: preset's)")
    if memory:
        p.add_argument("--memory", choices=list(MEMORY_MODES), default=None, help="how far-back history enters")
    p.add_argument("--latent-dim", type=int, default=None, help="MLA latent width d_c (default: preset's)")
    p.add_argument("--rope-dim", type=int, default=None, help="MLA decoupled RoPE key width d_r (default: preset's)")
    p.add_argument(
        "--cache-dtype",
        choices=["fp32", "bf16", "fp16", "fp8"],
        default=None,
        help="cache storage dtype (fp8: e4m3 MLA latent with per-token scales)",
    )


def build_config(args: argparse.Namespace) -> ModelConfig:
    """ModelConfig from the model options; invalid combinations become a UsageError."""
    try:
        return ModelConfig.from_name(
            args.preset,
            attention=args.attention,
            memory=getattr(args, "memory", None),
            latent_dim=args.latent_dim,
            rope_dim=args.rope_dim,
            cache_dtype=args.cache_dtype,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
