"""Options shared by `run` and `submit`, and their validation into a :class:`RunSpec`.

Every check happens before anything is written or started: bad input is one UsageError.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path

from orchestrator.cli_common import (
    UsageError,
    WorldChoice,
    add_model_options,
    add_world_options,
    build_config,
    wan_source,
    world_choice,
)
from orchestrator.registry import RUN_FILE, RunSpec, StreamEntry
from workers.types import StreamSpec


def add_run_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Add the run options; returns their actions (``submit`` forwards them to the job's `run`)."""
    before = len(p._actions)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--streams", type=int, default=None, help="N streams s0..s{N-1} with seeds S..S+N-1 (default 3)")
    src.add_argument(
        "--spec", default=None, help="TOML or JSON file: [[streams]] with id, seed, prompt, chunks, trajectory, world"
    )
    add_model_options(p)
    add_world_options(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--chunks", type=int, default=None, help="chunks per stream (default 12)")
    length.add_argument("--infinite", action="store_true", help="streams run until `longroll stop`")
    p.add_argument("--workers", type=int, default=2, help="GeneratorWorker actors (default 2)")
    p.add_argument("--checkpoint-every", type=int, default=8, help="checkpoint each stream every K chunks")
    p.add_argument(
        "--segment-chunks",
        type=int,
        default=None,
        help="chunks per mp4 segment; must divide --checkpoint-every (default: = K)",
    )
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept per stream")
    p.add_argument("--keep-segments", type=int, default=None, help="keep only the newest N segments per stream")
    p.add_argument("--streams-per-worker", type=int, default=None, help="capacity of one worker (default: no limit)")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="logical CPUs reserved per worker (CPU-only)")
    p.add_argument("--group-size", type=int, default=1, help="ranks per worker: one generator over N GPUs (default 1)")
    p.add_argument("--out", default="out/run", help="output directory (default out/run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first stream of --streams")
    p.add_argument("--prompt", default="", help="prompt of every --streams stream")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscale of the written video")
    p.add_argument("--checkpoint-uri", default=None, help="pyarrow.fs URI or path of checkpoints (default DIR/streams)")
    p.add_argument("--memory-uri", default=None, help="LanceDB URI of the memory store (default DIR/memory)")
    dash = p.add_mutually_exclusive_group()
    dash.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help=f"port of the run's web dashboard (default {DEFAULT_DASHBOARD_PORT}; a free one if taken; 0: any free)",
    )
    dash.add_argument("--no-dashboard", action="store_true", help="serve no web dashboard")
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="address the dashboard binds (default 127.0.0.1; 0.0.0.0 exposes it, token still needed to act)",
    )
    p.add_argument(
        "--dashboard-allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a Host name the dashboard answers besides 127.0.0.1, localhost and its bound address (repeatable)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="fail the run (exit 1) when no stream makes progress for S seconds (default 600)",
    )
    p.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)  # benchmarks: fake generator
    return p._actions[before:]


DEFAULT_DASHBOARD_PORT = 8470


def _positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UsageError(f"{name} must be > 0, got {value}")


def load_spec_file(path: str) -> list[dict]:
    """Stream entries of a TOML or JSON spec file (chosen by suffix; other suffixes: JSON, then TOML)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"spec file not found: {path}")
    text = p.read_text(errors="replace")
    parsers = {".toml": [tomllib.loads], ".json": [json.loads]}.get(p.suffix.lower(), [json.loads, tomllib.loads])
    data, errors = None, []
    for parse in parsers:
        try:
            data = parse(text)
            break
        except (ValueError, tomllib.TOMLDecodeError) as e:  # JSONDecodeError is a ValueError
            errors.append(str(e).splitlines()[0])
    if data is None:
        raise UsageError(f"spec file {path} is not valid TOML/JSON: {errors[-1]}")
    streams = data if isinstance(data, list) else data.get("streams") if isinstance(data, dict) else None
    if not isinstance(streams, list) or not streams or not all(isinstance(s, dict) for s in streams):
        raise UsageError(f"spec file {path} needs a non-empty list `streams` of tables/objects")
    return streams


def build_streams(args, world: WorldChoice) -> list[StreamEntry]:
    default_chunks = None if args.infinite else (args.chunks if args.chunks is not None else 12)
    if args.spec is not None:
        raw = load_spec_file(args.spec)
    else:
        n = 3 if args.streams is None else args.streams
        _positive("--streams", n, allow_none=False)
        raw = [{"id": f"s{i}", "seed": args.seed + i, "prompt": args.prompt} for i in range(n)]
    out, seen = [], set()
    for i, s in enumerate(raw):
        unknown = set(s) - {"id", "seed", "prompt", "chunks", "trajectory", "world"}
        if unknown:
            raise UsageError(
                f"stream {i}: unknown keys {sorted(unknown)} (allowed: id, seed, prompt, chunks, trajectory, world)"
            )
        chunks = s.get("chunks", default_chunks)
        if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks <= 0):
            raise UsageError(f"stream {s.get('id')!r}: chunks must be a positive integer, got {chunks!r}")
        try:
            fields = world.spec_fields(s.get("seed", 0), s.get("trajectory"), s.get("world"))
            spec = StreamSpec(s.get("id"), s.get("seed", 0), str(s.get("prompt", "")), **fields)
        except UsageError as e:
            raise UsageError(f"stream {i}: {e}") from None
        except (ValueError, TypeError) as e:
            raise UsageError(f"stream {i}: {e}") from None
        if spec.stream_id in seen:
            raise UsageError(f"duplicate stream id {spec.stream_id!r}")
        seen.add(spec.stream_id)
        out.append(StreamEntry(spec, chunks))
    return out


def build_run_spec(args, check_out: bool = True) -> RunSpec:
    """Validate the run options into a RunSpec. Raises UsageError; writes nothing."""
    for name in (
        "chunks",
        "workers",
        "checkpoint_every",
        "segment_chunks",
        "keep_checkpoints",
        "keep_segments",
        "streams_per_worker",
        "worker_cpus",
        "upscale",
        "group_size",
    ):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not 0 <= args.dashboard_port <= 65535:
        raise UsageError(f"--dashboard-port must be in 0..65535, got {args.dashboard_port}")
    cfg = build_config(args)
    if args.group_size > 1:
        from workers.group_parallel import check_group

        try:
            check_group(cfg, args.group_size)
        except ValueError as e:
            raise UsageError(f"--group-size {args.group_size}: {e}") from None
    if not cfg.can_decode and cfg.family != "wan" and not args.stub:
        raise UsageError(f"preset {cfg.name!r} has no VAE decoder here; `run` needs a decodable preset such as tiny")
    seg = args.segment_chunks or args.checkpoint_every
    if args.checkpoint_every % seg:
        raise UsageError(f"--segment-chunks {seg} must divide --checkpoint-every {args.checkpoint_every}")
    source = None
    if cfg.family == "wan":  # streams write latent segments (no VAE decoder yet)
        cfg, source = wan_source(args, cfg)
        world = WorldChoice(source.weights or "random", "", (), None)
    else:
        world = world_choice(args, cfg)
    streams = build_streams(args, world)
    out = Path(args.out)
    if check_out:
        if (out / RUN_FILE).exists():
            raise UsageError(f"{out} already holds a run; continue it with `longroll resume --out {out}`")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"output directory {out} exists and is not empty")
        parent = out.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise UsageError(f"output directory is not writable: {parent}")
    return RunSpec(
        out_dir=str(out.resolve()),
        model=cfg.to_dict(),
        streams=streams,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        segment_chunks=seg,
        keep_checkpoints=args.keep_checkpoints,
        keep_segments=args.keep_segments,
        streams_per_worker=args.streams_per_worker,
        worker_cpus=args.worker_cpus,
        group_size=args.group_size,
        weights=world.weights,
        model_source=source.to_dict() if source is not None else None,
        upscale=args.upscale,
        checkpoint_uri=args.checkpoint_uri,
        memory_uri=args.memory_uri,
        stub=args.stub,
        dashboard_host=args.dashboard_host,
        dashboard_port=None if args.no_dashboard else args.dashboard_port,
        dashboard_allow_hosts=list(args.dashboard_allow_host),
        stall_timeout_s=args.stall_timeout,
    )
