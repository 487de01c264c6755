"""Pieces shared by the subcommands: the one-line-error parser, model options, bad-input errors."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

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


def add_world_options(p: argparse.ArgumentParser) -> None:
    """Weights, camera trajectory and world prompt (the trained world model's inputs)."""
    p.add_argument(
        "--weights",
        default=None,
        help="shipped | random | FILE.safetensors (default: shipped where they fit the model, else random)",
    )
    p.add_argument(
        "--trajectory",
        default=None,
        help="camera path: revisit, still, none, or a JSON file of per-frame [dy, dx] moves in patches "
        "(default: revisit with the shipped world model, else none)",
    )
    p.add_argument(
        "--world",
        type=int,
        default=None,
        help="procedural world seed; the first chunk is its true view (default: the stream's seed with a trajectory)",
    )


@dataclass(frozen=True)
class WorldChoice:
    weights: str  # "shipped", "random" or a path
    trajectory: str  # "" (no camera), "still", "revisit" or "file"
    actions: tuple[tuple[int, int], ...]  # the file's moves
    world: int | None  # explicit world seed (None: each stream's seed when there is a trajectory)

    def spec_fields(self, seed: int, trajectory: str | None = None, world: int | None = None) -> dict:
        """StreamSpec keyword fields of one stream (per-stream trajectory/world override the options')."""
        kind, actions = self.trajectory, self.actions
        if trajectory is not None:
            kind, actions = parse_trajectory(trajectory)
        if not kind:
            if world is not None:
                raise UsageError("a world needs a camera trajectory (not 'none')")
            return {}
        w = world if world is not None else self.world if self.world is not None else seed
        return {"trajectory": kind, "actions": actions, "world": w}


def parse_trajectory(value: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    if value == "none":
        return "", ()
    from workers.trajectory import Trajectory

    try:
        t = Trajectory.parse(value)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return t.kind, t.actions


def world_choice(args: argparse.Namespace, cfg: ModelConfig) -> WorldChoice:
    """Resolve --weights/--trajectory/--world against the model. Raises UsageError."""
    from workers.weights import SHIPPED, default_weights, resolve

    weights = args.weights or default_weights(cfg)
    try:
        resolve(weights, cfg)
    except ValueError as e:
        raise UsageError(f"--weights {weights}: {e}") from None
    if args.world is not None and not 0 <= args.world < 2**63:
        raise UsageError(f"--world must be in [0, 2**63), got {args.world}")
    kind, actions = parse_trajectory(args.trajectory or ("revisit" if weights == SHIPPED else "none"))
    if not kind and args.world is not None:
        raise UsageError("--world needs a camera trajectory (not --trajectory none)")
    return WorldChoice(weights, kind, actions, args.world)
