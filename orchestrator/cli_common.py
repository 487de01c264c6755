"""Pieces shared by the subcommands: the one-line-error parser, model options, bad-input errors."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrator import bounds
from workers.config import MEMORY_MODES, PRESETS, ModelConfig
from workers.models.source import ModelSource


class UsageError(ValueError):
    """Bad input: reported as one `error: ...` line with exit code 2, before anything is written."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + two lines otherwise)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


# ---- bounds (orchestrator/bounds.py holds the limits) -----------------------------------------
def check_value(label: str, value, rng: bounds.Range) -> None:
    """UsageError ``{label} must be ...`` unless ``value`` lies in ``rng``."""
    problem = rng.problem(value)
    if problem:
        raise UsageError(f"{label} {problem}")


def check_flags(args: argparse.Namespace, table: dict[str, bounds.Range]) -> None:
    """Every flag of ``table`` (argparse dest -> Range) that is set lies in its range. Raises UsageError."""
    for dest, rng in table.items():
        value = getattr(args, dest, None)
        if value is not None:
            note = bounds.FLAG_NOTES.get(dest)
            check_value("--" + dest.replace("_", "-") + (f" ({note})" if note else ""), value, rng)


def check_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is not None:
        check_value("--threads", args.threads, bounds.threads_range(bounds.this_machine()))


def check_prompt(label: str, prompt: str) -> None:
    size = len(prompt.encode("utf-8", errors="surrogatepass"))
    if size > bounds.MAX_PROMPT_BYTES:
        raise UsageError(
            f"{label} is {size} bytes of UTF-8; at most {bounds.MAX_PROMPT_BYTES} (umT5 reads 512 tokens anyway)"
        )


def check_input_file(label: str, path: str | os.PathLike) -> Path:
    """An existing regular file no larger than MAX_INPUT_FILE_BYTES (read whole). Raises UsageError."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{label} not found: {path}")
    size = p.stat().st_size
    if size > bounds.MAX_INPUT_FILE_BYTES:
        raise UsageError(f"{label} {path} is {size} bytes; at most {bounds.MAX_INPUT_FILE_BYTES} (16 MiB) are read")
    return p


def check_upscaled_frame(cfg: ModelConfig, upscale: int) -> None:
    """A written (decoded) frame times ``upscale`` is at most MAX_FRAME_SIDE px a side. Raises UsageError."""
    if not cfg.can_decode:  # latents only: nothing is upscaled
        return
    h, w = cfg.latent_height * cfg.vae_stride[1] * upscale, cfg.latent_width * cfg.vae_stride[2] * upscale
    if max(h, w) > bounds.MAX_FRAME_SIDE:
        raise UsageError(
            f"--upscale {upscale} makes {w}x{h} px frames; at most {bounds.MAX_FRAME_SIDE} px a side "
            f"({w * h * 3 / 2**20:.0f} MiB per RGB frame otherwise)"
        )


def is_uri(location: str) -> bool:
    """An object-store / remote URI (s3://, gs://, db://, ...): not probed here."""
    return "://" in location


def check_writable_location(label: str, location: str) -> None:
    """A local directory path that exists writable or can be created: its nearest existing ancestor
    must be a writable directory. A real probe (a temporary file, removed at once): permission bits
    say nothing for root or on read-only mounts. URIs with a scheme are left alone. Raises UsageError."""
    if is_uri(location):
        return
    path = Path(location).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{label} {location} exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{label} {location} is not writable: {probe} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".longroll-probe-"):
            pass
    except OSError:
        raise UsageError(f"{label} {location} is not writable: cannot create files in {probe}") from None


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
    r = p.add_argument_group("rollout (default: the preset's; a --config file, then these flags, override it)")
    r.add_argument(
        "--config",
        default=None,
        help="YAML/TOML rollout settings: longroll's names or a Self-Forcing / CausVid / LongLive inference YAML",
    )
    r.add_argument("--sink-frames", type=int, default=None, help="latent frames of the frame sink")
    r.add_argument("--window-frames", type=int, default=None, help="latent frames of the local window ring")
    r.add_argument("--frames-per-chunk", type=int, default=None, help="latent frames generated per step")
    r.add_argument(
        "--denoising-steps", default=None, help="comma-separated timesteps in (0, 1000], e.g. 1000,750,500,250"
    )
    r.add_argument("--shift", type=float, default=None, help="timestep shift applied to the denoising steps")
    r.add_argument("--position", choices=["absolute", "relative"], default=None, help="temporal id policy")
    r.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="compute dtype")
    r.add_argument("--height", type=int, default=None, help="video height in pixels (latent = height / VAE stride)")
    r.add_argument("--width", type=int, default=None, help="video width in pixels (latent = width / VAE stride)")


def _rollout_flags(args: argparse.Namespace, base: ModelConfig) -> dict:
    """ModelConfig overrides from --config and the rollout flags (flags win). Raises UsageError."""
    out: dict = {}
    if getattr(args, "config", None):
        from orchestrator.rollout_config import rollout_overrides

        check_input_file("config file", args.config)
        try:
            found, ignored = rollout_overrides(args.config, base.frames_per_chunk, base.sink_frames)
        except RecursionError:
            raise UsageError(f"config file {args.config} is nested too deeply") from None
        for key, value in found.items():
            if key in bounds.ROLLOUT:
                check_value(f"config file {args.config}: {key}", value, bounds.ROLLOUT[key])
            elif key in ("denoising_steps", "sigmas"):
                _check_step_count(f"config file {args.config}: {key}", value)
        out.update(found)
        if ignored:
            print(f"note: {args.config}: ignored keys not about the rollout: {', '.join(ignored)}", file=sys.stderr)
    for flag in ("sink_frames", "window_frames", "frames_per_chunk", "shift", "position", "dtype"):
        if getattr(args, flag, None) is not None:
            out[flag] = getattr(args, flag)
    steps = getattr(args, "denoising_steps", None)
    if steps is not None:
        try:
            out["denoising_steps"] = tuple(float(t) for t in steps.split(",") if t.strip())
        except ValueError:
            raise UsageError(f"--denoising-steps must be comma-separated numbers, got {steps!r}") from None
        _check_step_count("--denoising-steps", out["denoising_steps"])
    for flag, field_name in (("height", "latent_height"), ("width", "latent_width")):
        px = getattr(args, flag, None)
        if px is None:
            continue
        stride = base.vae_stride[1]
        if px <= 0 or px % (stride * base.patch):
            raise UsageError(f"--{flag} {px} must be a positive multiple of {stride * base.patch} (VAE stride x patch)")
        out[field_name] = px // stride
    return out


def _check_step_count(label: str, steps) -> None:
    if isinstance(steps, (tuple, list)) and len(steps) > bounds.MAX_DENOISING_STEPS:
        raise UsageError(
            f"{label} has {len(steps)} steps; at most {bounds.MAX_DENOISING_STEPS} (timesteps lie in (0, 1000])"
        )


def build_config(args: argparse.Namespace) -> ModelConfig:
    """ModelConfig from the model options; invalid combinations become a UsageError."""
    check_flags(args, bounds.MODEL_FLAGS)
    try:
        base = ModelConfig.from_name(args.preset)
        rollout = _rollout_flags(args, base)
        if "max_temporal_id" not in rollout and rollout.keys() & {"sink_frames", "window_frames", "frames_per_chunk"}:
            # a longer context needs room for its temporal ids (relative policy): the preset's cap grows with it
            span = sum(rollout.get(k, getattr(base, k)) for k in ("sink_frames", "window_frames", "frames_per_chunk"))
            rollout["max_temporal_id"] = max(base.max_temporal_id, span - 1)
        return ModelConfig.from_name(
            args.preset,
            attention=args.attention,
            memory=getattr(args, "memory", None),
            latent_dim=args.latent_dim,
            rope_dim=args.rope_dim,
            cache_dtype=args.cache_dtype,
            **rollout,
        )
    except (ValueError, TypeError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None


def add_world_options(p: argparse.ArgumentParser) -> None:
    """Weights, camera trajectory and world prompt (the trained world model's inputs), and Wan's weights parts."""
    p.add_argument(
        "--weights",
        default=None,
        help="tiny: shipped | random | FILE.safetensors (default: shipped where they fit the model, else random); "
        "wan presets: a diffusers transformer or pipeline folder, an original Wan2.1 folder, a Self-Forcing / "
        "CausVid / LongLive .pt or a converted .safetensors (default: random init)",
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
    w = p.add_argument_group("wan weights")
    w.add_argument("--base", default=None, help="folder whose config.json gives a bare .pt its shapes")
    w.add_argument("--lora", default=None, help="LongLive LoRA file, merged into the weights at load")
    w.add_argument("--no-ema", action="store_true", help="a Self-Forcing .pt's generator, not generator_ema")
    w.add_argument(
        "--prompt-embeds",
        default=None,
        help="safetensors with tensor prompt_embeds [L, text_dim] (unpadded): skips the text encoder",
    )
    w.add_argument(
        "--text-encoder", default=None, help="folder with text_encoder/ and tokenizer/ (umT5) if the weights have none"
    )
    w.add_argument(
        "--vae",
        default=None,
        metavar="DIR|FILE",
        help="Wan2.1 VAE (a diffusers vae/ or pipeline folder, or Wan2.1_VAE.pth): streams decode to video "
        "(a pipeline folder given to --weights brings its own)",
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
    from workers.world.trajectory import BUILTINS, Trajectory

    if value not in BUILTINS and Path(value).suffix == ".json":
        check_input_file("trajectory file", value)
    try:
        t = Trajectory.parse(value)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    except RecursionError:
        raise UsageError(f"trajectory file {value} is nested too deeply") from None
    return t.kind, t.actions


def world_choice(args: argparse.Namespace, cfg: ModelConfig) -> WorldChoice:
    """Resolve --weights/--trajectory/--world against the model. Raises UsageError."""
    from workers.weights import SHIPPED, default_weights, resolve

    weights = args.weights or default_weights(cfg)
    try:
        resolve(weights, cfg)
    except ValueError as e:
        raise UsageError(f"--weights {weights}: {e}") from None
    check_flags(args, bounds.WORLD_FLAGS)
    kind, actions = parse_trajectory(args.trajectory or ("revisit" if weights == SHIPPED else "none"))
    if not kind and args.world is not None:
        raise UsageError("--world needs a camera trajectory (not --trajectory none)")
    return WorldChoice(weights, kind, actions, args.world)


def wan_source(args: argparse.Namespace, cfg: ModelConfig) -> tuple[ModelConfig, ModelSource]:
    """Resolve a Wan-family model's weights options; the config takes the weights' own shapes.

    Every check that can fail on bad input runs here, before anything is written: the weights'
    layout and keys, the prompt embeddings file, and that the prompt can be encoded at all.
    Raises:
        UsageError: with one line saying what is wrong.
    """
    if getattr(args, "trajectory", None) not in (None, "none") or getattr(args, "world", None) is not None:
        raise UsageError("--trajectory and --world are for the world model; wan presets have no camera")
    try:
        import diffusers  # noqa: F401 - the wan family runs on diffusers' Wan modules
    except ImportError:
        raise UsageError("wan presets need the wan extra: pip install 'longroll[wan]'") from None
    weights = None if args.weights in (None, "", "random") else args.weights
    if weights is None and (args.base or args.lora):
        raise UsageError("--base and --lora need --weights")
    source = ModelSource(
        weights=weights, base=args.base, lora=args.lora, ema=not args.no_ema,
        prompt_embeds=args.prompt_embeds, text_encoder=args.text_encoder, vae=args.vae,
    )  # fmt: skip
    parts = None
    if weights is not None:
        from workers.models.wan.family import config_for_weights
        from workers.models.wan.weights import WeightsError, check_source, resolve_source

        try:
            parts = resolve_source(weights, args.base, args.lora)
            cfg = config_for_weights(cfg, parts.config)
            check_source(parts, cfg_transformer_config(cfg), ema=source.ema)
        except WeightsError as e:
            raise UsageError(f"--weights {weights}: {e}") from None
        except ValueError as e:
            raise UsageError(f"--weights {weights}: {e}") from None
    pipeline_vae = parts.vae if parts is not None and parts.kind == "diffusers-pipeline" else None
    if source.vae is None and pipeline_vae and (Path(pipeline_vae) / "config.json").is_file():
        source = replace(source, vae=pipeline_vae)  # the pipeline's own VAE comes along
    if source.vae is not None:
        check_vae(source.vae, cfg)
    if source.prompt_embeds is not None:
        from workers.models.wan.text import TextError, load_prompt_embeds

        try:
            load_prompt_embeds(source.prompt_embeds, cfg.cond_dim, cfg.text_len)
        except TextError as e:
            raise UsageError(str(e)) from None
    elif source.text_encoder is not None:
        root = Path(source.text_encoder)
        if not (root / "text_encoder").is_dir() or not (root / "tokenizer").is_dir():
            raise UsageError(f"--text-encoder {root} needs text_encoder/ and tokenizer/ folders (a diffusers pipeline)")
    elif weights is not None and not (parts.tokenizer_dir and (parts.text_encoder_dir or parts.original_text_encoder)):
        raise UsageError(
            f"no umT5 text encoder beside {weights}: pass --prompt-embeds FILE.safetensors or --text-encoder DIR"
        )
    return cfg, source


def check_vae(path: str, cfg: ModelConfig) -> None:
    """The VAE loads and its latents are the transformer's (channels). Raises UsageError."""
    from workers.models.wan.vae import load_vae

    try:
        vae = load_vae(path, device="meta")
    except (ValueError, OSError) as e:
        raise UsageError(f"--vae {path}: {e}") from None
    z = vae.config.z_dim
    if z != cfg.latent_channels:
        raise UsageError(f"--vae {path}: its latents have {z} channels, the transformer's have {cfg.latent_channels}")


def cfg_transformer_config(cfg: ModelConfig) -> dict:
    from workers.models.wan.model import transformer_config

    return transformer_config(cfg)
