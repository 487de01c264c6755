"""`longroll generate`: one stream in this process, written to an mp4 and/or a latents file.

With a Wan preset (no VAE decoder yet) it writes latents (``--latents-out``); ``--trace`` records every
denoising step for parity checks against a reference pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from orchestrator import bounds
from orchestrator.budget_options import add_budget_options, budget_overrides, check_budget
from orchestrator.cli_common import (
    UsageError,
    add_model_options,
    add_world_options,
    build_config,
    check_flags,
    check_prompt,
    check_threads,
    check_upscaled_frame,
    check_writable_location,
    wan_source,
    world_choice,
)
from workers.generator import Generator
from workers.models.source import ModelSource
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
    length = g.add_mutually_exclusive_group(required=True)
    length.add_argument(
        "--frames", type=int, help="frames to generate: video frames, or latent frames for presets without a decoder"
    )
    length.add_argument("--chunks", type=int, help="chunks to generate (frames_per_chunk latent frames each)")
    g.add_argument("--out", default=None, help="output .mp4 file (optional with --latents-out)")
    g.add_argument(
        "--latents-out", default=None, help="also write the latents: safetensors, tensor latents [F, C, H, W] float32"
    )
    g.add_argument(
        "--trace",
        default=None,
        help="safetensors of every chunk c and step s: x_t.{c}.{s}, sigma.{c}.{s}, x0.{c}.{s}, and latents",
    )
    g.add_argument(
        "--memory-uri",
        default=None,
        help="LanceDB database for --memory retrieval (default: OUT's name with .memory beside it)",
    )
    add_budget_options(g)
    g.add_argument("--seed", type=int, default=0, help="stream seed: chunk i's noise depends on (seed, i)")
    g.add_argument("--prompt", default="", help="the text prompt (tiny: hashed into its conditioning vector)")
    g.add_argument(
        "--upscale", type=int, default=4, help="world model: nearest-neighbour upscale of the written video (Wan: 1)"
    )
    g.add_argument("--lossless", action="store_true", help="mp4 in lossless RGB (libx264rgb qp 0): exact frames")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=run)


def run(args) -> int:
    summary = run_generate(args)
    if args.json:
        print(json.dumps(summary))
    else:
        wrote = " and ".join(p for p in (summary["out"], summary["latents_out"]) if p)
        print(
            f"wrote {wrote}: {summary['frames']} {summary['unit']} in {summary['seconds']:.1f} s "
            f"= {summary['fps']:.1f} {summary['unit']}/s; "
            f"{summary['attention']} cache {summary['cache_bytes'] / 1e6:.2f} MB "
            f"({summary['cache_bytes_per_token']:.0f} bytes/token)"
        )
    return 0


def check_tensor_path(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    try:
        return check_output_path(path, ".safetensors")
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written beside its target and renamed into place: never half-written."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_generate_memory(uri: str | None, out: Path, cfg, budget: dict | None = None):
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
    link = MemoryLink(uri, cfg, **(budget or {}))
    if "generate" in list_streams(connect(link.config)):
        link.close()
        raise UsageError(f"memory database {uri} already holds a 'generate' stream; pass a fresh --memory-uri")
    return link


def check_length(args, cfg, video: bool) -> None:
    """--frames / --chunks within MAX_CHUNKS chunks, and every latent (kept until the end) in memory."""
    per_chunk = cfg.frames_per_chunk * (cfg.vae_stride[0] if video else 1)  # frames of --frames per chunk
    chunks = args.chunks if args.chunks is not None else -(-args.frames // per_chunk)
    if chunks > bounds.MAX_CHUNKS:
        raise UsageError(
            f"--frames {args.frames} needs {chunks} chunks of {per_chunk} frames; at most {bounds.MAX_CHUNKS} "
            "(chunk numbers are 8 digits everywhere on disk)"
        )
    frame = cfg.latent_channels * cfg.latent_height * cfg.latent_width * 4  # float32 latents
    copies = 2 + (2 * len(cfg.sigmas) if args.trace else 0)  # the list and its concatenation; --trace: x_t, x0
    held = chunks * cfg.frames_per_chunk * frame * copies
    m = bounds.this_machine()
    if held > m.memory_bytes * bounds.MEMORY_FRACTION:
        flag = f"--chunks {args.chunks}" if args.chunks is not None else f"--frames {args.frames}"
        raise UsageError(
            f"{flag} keeps {held / 1e9:.1f} GB of latents in memory until the end, more than "
            f"{bounds.MEMORY_FRACTION:.0%} of this machine's {m.memory_bytes / 1e9:.1f} GB: generate fewer frames "
            "or use `longroll run`, which writes segments as it goes"
        )


def run_generate(args) -> dict:
    check_flags(args, bounds.GENERATE_FLAGS)
    check_threads(args)
    check_prompt("--prompt", args.prompt)
    cfg = build_config(args)
    latents_out = check_tensor_path(args.latents_out, "--latents-out")
    trace_out = check_tensor_path(args.trace, "--trace")
    if args.out is None and latents_out is None:
        raise UsageError("give --out FILE.mp4, --latents-out FILE.safetensors or both")
    if not cfg.can_decode and cfg.family != "wan" and args.out is not None:
        raise UsageError(
            f"preset {cfg.name!r} makes latents and no VAE decoder is available here: "
            "write them with --latents-out FILE.safetensors (without --out)"
        )
    out = check_output_path(args.out) if args.out is not None else None
    if args.memory_uri is not None:
        check_writable_location("--memory-uri", args.memory_uri)
    budget = budget_overrides(args)
    check_budget(cfg, budget)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if cfg.family == "wan":
        cfg, source = wan_source(args, cfg)
        spec = StreamSpec("generate", seed=args.seed, prompt=args.prompt)
        weights_name = source.weights or "random"
        if out is not None and source.vae is None:
            raise UsageError(
                "a video (--out) of a wan preset needs the Wan2.1 VAE: pass --vae DIR|FILE (or a pipeline folder "
                "with vae/ to --weights), or write latents with --latents-out FILE.safetensors"
            )
    else:
        world = world_choice(args, cfg)
        spec = StreamSpec("generate", seed=args.seed, prompt=args.prompt, **world.spec_fields(args.seed))
        from workers.weights import resolve

        source = ModelSource(weights=resolve(world.weights, cfg))
        weights_name = world.weights
    check_length(args, cfg, video=out is not None)
    if out is not None:
        check_upscaled_frame(cfg, args.upscale)
    fpc = cfg.frames_per_chunk
    if args.chunks is not None:
        frames = args.chunks * fpc
        if out is not None and source.vae is not None:  # the causal VAE: 1 frame, then 4 per latent frame
            frames = 1 + cfg.vae_stride[0] * (frames - 1)
        elif out is not None:
            frames *= cfg.vae_stride[0]
    else:
        frames = args.frames
    # latent frames to generate: a decoded video needs its frames; a latents file holds whole chunks
    latent_target = args.chunks * fpc if args.chunks is not None else frames
    link = None
    if cfg.memory == "retrieval":
        link = open_generate_memory(args.memory_uri, out or latents_out, cfg, budget)
        from workers.memory import default_embedder

        gen = Generator(cfg, memory=link.retriever, embedder=default_embedder(cfg), source=source)
    else:
        gen = Generator(cfg, source=source)
    if trace_out is not None:
        gen.trace = {}
    state = gen.new_stream(spec)
    log.info("generate.start", preset=cfg.name, attention=cfg.attention, frames=frames, out=str(out or latents_out))
    t0 = time.perf_counter()
    latents: list[torch.Tensor] = []
    unit = "frames" if out is not None else "latent frames"
    done = 0
    try:
        with contextlib.ExitStack() as stack:
            upscale = args.upscale if cfg.family != "wan" else 1  # Wan video is written at the VAE's size
            writer = (
                stack.enter_context(Mp4Writer(out, fps=cfg.fps, upscale=upscale, lossless=args.lossless))
                if out
                else None
            )
            bar = stack.enter_context(
                tqdm(total=frames, unit="frame", desc="generate", disable=args.quiet or not sys.stderr.isatty())
            )
            while (writer.frames_written < frames) if writer else (done < latent_target):
                (chunk,) = gen.step([state])
                if link is not None:
                    link.publish(chunk)
                latents.append(chunk.latents)
                if writer is not None:
                    new = chunk.frames[: frames - writer.frames_written]
                    writer.write(new)
                    n = len(new)
                else:
                    n = min(chunk.latents.shape[0], latent_target - done)
                done += n
                bar.update(n)
                bar.set_postfix(fps=f"{done / (time.perf_counter() - t0):.1f}")
            all_latents = torch.cat(latents)
            if latents_out is not None:
                save_tensors_atomic(latents_out, {"latents": all_latents})
            if trace_out is not None:
                save_tensors_atomic(trace_out, {**trace_tensors(gen.trace, spec.stream_id), "latents": all_latents})
    finally:
        if link is not None:
            link.close()
    seconds = time.perf_counter() - t0
    return {
        "out": str(out) if out else None,
        "latents_out": str(latents_out) if latents_out else None,
        "trace": str(trace_out) if trace_out else None,
        "frames": done,
        "unit": unit,
        "chunks": len(latents),
        "latent_shape": list(all_latents.shape),
        "seconds": seconds,
        "fps": done / seconds,
        "cache_bytes": state.cache.nbytes(),
        "cache_bytes_per_token": cfg.cache_layout().bytes_per_token(),
        "attention": cfg.attention,
        "memory": cfg.memory,
        "memory_uri": link.config.uri if link is not None else None,
        "preset": cfg.name,
        "family": cfg.family,
        "weights": weights_name,
        "weights_sha": gen.weights_sha,
        "trajectory": spec.trajectory or "none",
        "world": spec.world,
    }


def trace_tensors(trace: dict[str, torch.Tensor], stream_id: str) -> dict[str, torch.Tensor]:
    """The generator's trace of one stream, keyed ``x_t.{chunk}.{step}`` (and sigma, x0) as --trace promises."""
    out = {}
    for key, t in trace.items():
        name, sid, rest = key.split(".", 2)
        if sid == stream_id:
            out[f"{name}.{rest}"] = t
    return out
