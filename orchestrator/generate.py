"""`longroll generate`: one stream in this process, written to an mp4."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from orchestrator.cli_common import UsageError, add_model_options, add_world_options, build_config, world_choice
from workers.generator import Generator
from workers.types import StreamSpec
from workers.video import Mp4Writer

log = structlog.get_logger(__name__)


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


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate one stream in this process and write an mp4")
    add_model_options(g)
    add_world_options(g)
    g.add_argument("--frames", type=int, required=True, help="number of frames to generate")
    g.add_argument("--out", required=True, help="output .mp4 file")
    g.add_argument(
        "--memory-uri",
        default=None,
        help="LanceDB database for --memory retrieval (default: OUT's name with .memory beside it)",
    )
    g.add_argument("--seed", type=int, default=0, help="stream seed: chunk i's noise depends on (seed, i)")
    g.add_argument("--prompt", default="", help="hashed into the stream's conditioning vector")
    g.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscale of the written video")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=run)


def run(args) -> int:
    summary = run_generate(args)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {summary['out']}: {summary['frames']} frames in {summary['seconds']:.1f} s "
            f"= {summary['fps']:.1f} frames/s; {summary['attention']} cache {summary['cache_bytes'] / 1e6:.2f} MB "
            f"({summary['cache_bytes_per_token']:.0f} bytes/token)"
        )
    return 0


def open_generate_memory(uri: str | None, out: Path, cfg):
    """The database of a one-off `generate` run: a fresh one beside the video unless a URI is given.

    The stream is always called "generate", so an explicit database that already holds it is refused
    (its history belongs to another rollout); the default one is ours and is recreated.
    Returns a :class:`workers.memory.MemoryLink`.
    """
    # imported here: LanceDB's runtime is not fork-safe, so the CLI loads it only when it is used
    from memory_store.db import connect, list_streams
    from workers.memory import MemoryLink

    if uri is None:
        default = out.with_suffix(".memory")
        if default.exists():
            shutil.rmtree(default)
        uri = str(default)
    link = MemoryLink(uri, cfg)
    if "generate" in list_streams(connect(link.config)):
        link.close()
        raise UsageError(f"memory database {uri} already holds a 'generate' stream; pass a fresh --memory-uri")
    return link


def run_generate(args) -> dict:
    if args.frames <= 0:
        raise UsageError(f"--frames must be > 0, got {args.frames}")
    out = check_output_path(args.out)
    cfg = build_config(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if not cfg.can_decode:
        raise UsageError(f"preset {cfg.name!r} has no VAE decoder here; it is for `longroll plan` and GPU benchmarks")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    world = world_choice(args, cfg)
    spec = StreamSpec("generate", seed=args.seed, prompt=args.prompt, **world.spec_fields(args.seed))
    from workers.weights import resolve

    weights = resolve(world.weights, cfg)
    link = None
    if cfg.memory == "retrieval":
        link = open_generate_memory(args.memory_uri, out, cfg)
        from workers.memory import default_embedder

        gen = Generator(cfg, weights=weights, memory=link.retriever, embedder=default_embedder(cfg))
    else:
        gen = Generator(cfg, weights=weights)
    state = gen.new_stream(spec)
    log.info("generate.start", preset=cfg.name, attention=cfg.attention, frames=args.frames, out=str(out))
    t0 = time.perf_counter()
    try:
        with (
            Mp4Writer(out, fps=cfg.fps, upscale=args.upscale) as writer,
            tqdm(
                total=args.frames, unit="frame", desc="generate", disable=args.quiet or not sys.stderr.isatty()
            ) as bar,
        ):
            while writer.frames_written < args.frames:
                (chunk,) = gen.step([state])
                if link is not None:
                    link.publish(chunk)
                frames = chunk.frames[: args.frames - writer.frames_written]
                writer.write(frames)
                bar.update(len(frames))
                bar.set_postfix(fps=f"{writer.frames_written / (time.perf_counter() - t0):.1f}")
    finally:
        if link is not None:
            link.close()
    seconds = time.perf_counter() - t0
    return {
        "out": str(out),
        "frames": args.frames,
        "seconds": seconds,
        "fps": args.frames / seconds,
        "cache_bytes": state.cache.nbytes(),
        "cache_bytes_per_token": cfg.cache_layout().bytes_per_token(),
        "attention": cfg.attention,
        "memory": cfg.memory,
        "memory_uri": link.config.uri if link is not None else None,
        "weights": world.weights,
        "trajectory": spec.trajectory or "none",
        "world": spec.world,
    }
