"""`longroll generate`: one stream in this process, written to an mp4."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from workers.config import ModelConfig
from workers.generator import Generator
from workers.types import StreamSpec
from workers.video import Mp4Writer

log = structlog.get_logger(__name__)


class UsageError(ValueError):
    """Bad input: reported as one `error: ...` line with exit code 2."""


def check_output_path(out: str, suffix: str = ".mp4") -> Path:
    path = Path(out)
    if path.suffix.lower() != suffix:
        raise UsageError(f"output file must end in {suffix}: {out}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    if path.is_dir():
        raise UsageError(f"output path is a directory: {out}")
    try:  # a real probe: permission bits say nothing for root or on read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".longroll-probe-"):
            pass
    except OSError:
        raise UsageError(f"output directory is not writable: {parent}") from None
    return path


def build_config(args) -> ModelConfig:
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


def run_generate(args) -> dict:
    if args.frames <= 0:
        raise UsageError(f"--frames must be > 0, got {args.frames}")
    out = check_output_path(args.out)
    cfg = build_config(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if not cfg.can_decode:
        raise UsageError(f"preset {cfg.name!r} has no VAE decoder here; it is for `longroll plan` and GPU benchmarks")
    gen = Generator(cfg)
    state = gen.new_stream(StreamSpec("generate", seed=args.seed, prompt=args.prompt))
    log.info("generate.start", preset=cfg.name, attention=cfg.attention, frames=args.frames, out=str(out))
    t0 = time.perf_counter()
    with (
        Mp4Writer(out, fps=cfg.fps, upscale=args.upscale) as writer,
        tqdm(
            total=args.frames,
            unit="frame",
            desc="generate",
            disable=args.quiet or not sys.stderr.isatty(),
            dynamic_ncols=True,
        ) as bar,
    ):
        while writer.frames_written < args.frames:
            (chunk,) = gen.step([state])
            frames = chunk.frames[: args.frames - writer.frames_written]
            writer.write(frames)
            bar.update(len(frames))
            bar.set_postfix(fps=f"{writer.frames_written / (time.perf_counter() - t0):.1f}")
    seconds = time.perf_counter() - t0
    return {
        "out": str(out),
        "frames": args.frames,
        "seconds": seconds,
        "fps": args.frames / seconds,
        "cache_bytes": state.cache.nbytes(),
        "cache_bytes_per_token": cfg.cache_layout().bytes_per_token(),
        "attention": cfg.attention,
    }
