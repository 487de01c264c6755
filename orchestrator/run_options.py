"""Options shared by `run` and `submit`, and their validation into a :class:`RunSpec`.

Every check happens before anything is written or started: bad input is one UsageError.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import tomllib
from pathlib import Path

from orchestrator import bounds
from orchestrator.budget_options import add_budget_options, budget_overrides, check_budget
from orchestrator.cli_common import (
    UsageError,
    WorldChoice,
    add_model_options,
    add_world_options,
    build_config,
    check_flags,
    check_input_file,
    check_prompt,
    check_upscaled_frame,
    check_value,
    check_writable_location,
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
    p.add_argument(
        "--upscale", type=int, default=4, help="world model: nearest-neighbour upscale of the written video (Wan: 1)"
    )
    p.add_argument("--lossless", action="store_true", help="mp4 in lossless RGB (libx264rgb qp 0): exact frames")
    p.add_argument(
        "--decode-actors",
        type=int,
        default=0,
        metavar="N",
        help="wan --vae: decode video in N Ray actors per worker, beside generation (default 0: in the worker)",
    )
    p.add_argument("--checkpoint-uri", default=None, help="pyarrow.fs URI or path of checkpoints (default DIR/streams)")
    p.add_argument("--memory-uri", default=None, help="LanceDB URI of the memory store (default DIR/memory)")
    add_budget_options(p)
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
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123


def host_problem(host: str) -> str | None:
    """None for a host name or an IP literal (IPv6 optionally in brackets), else what is wrong."""
    what = "must be a host name or IP address (no scheme, port, path or spaces)"
    if not host or len(host) > bounds.MAX_HOST_NAME:
        return f"{what} of 1..{bounds.MAX_HOST_NAME} characters, got {host[:80]!r}"
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(literal)
        return None
    except ValueError:
        if literal != host:
            return f"{what}: brackets only around an IPv6 address, got {host!r}"
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit():
        return None
    return f"{what}, got {host!r}"


def _check_dashboard_hosts(args) -> None:
    problem = host_problem(args.dashboard_host)
    if problem:
        raise UsageError(f"--dashboard-host {problem}")
    hosts = list(args.dashboard_allow_host)
    if len(hosts) > bounds.MAX_ALLOW_HOSTS:
        raise UsageError(f"--dashboard-allow-host given {len(hosts)} times; at most {bounds.MAX_ALLOW_HOSTS}")
    for host in hosts:
        problem = host_problem(host)
        if problem:
            raise UsageError(f"--dashboard-allow-host {problem}")


def _check_workers(args) -> None:
    """Worker processes and reserved CPUs: an absolute cap, and this machine's CPUs for an embedded Ray."""
    ranks = args.workers * args.group_size
    if ranks > bounds.MAX_WORKERS:
        raise UsageError(
            f"--workers {args.workers} x --group-size {args.group_size} = {ranks} worker processes; "
            f"at most {bounds.MAX_WORKERS} per run (each is a process with its own copy of the model)"
        )
    if getattr(args, "address", None):  # a cluster: its size is known only once connected
        return
    m = bounds.this_machine()
    cap = m.cpus * bounds.OVERSUBSCRIPTION
    cpus = ranks * args.worker_cpus
    if ranks > cap or cpus > cap:
        what = f"{ranks} worker processes" if ranks > cap else f"{cpus:g} CPUs (x --worker-cpus {args.worker_cpus:g})"
        raise UsageError(
            f"--workers {args.workers} needs {what}; the embedded Ray on this machine takes at most {cap} "
            f"({bounds.OVERSUBSCRIPTION}x its {m.cpus} CPUs): lower it, or run on a cluster with --address"
        )


def _check_stream_memory(args, cfg, streams: list[StreamEntry], segment_chunks: int) -> None:
    """The streams an embedded run holds at once must fit in this machine's memory (plan's per-stream budget)."""
    if getattr(args, "address", None):  # a cluster's memory is unknown before connecting: MAX_STREAMS only
        return
    from orchestrator.plan import stream_budget

    per_stream, parts = stream_budget(cfg).total, "cache and activations"
    if not cfg.can_decode:  # latent segments are held in memory until they close
        frame = cfg.latent_channels * cfg.latent_height * cfg.latent_width * 4  # float32
        per_stream, parts = per_stream + segment_chunks * cfg.frames_per_chunk * frame, "cache, activations, segment"
    resident = len(streams)
    if args.streams_per_worker is not None:
        resident = min(resident, args.workers * args.streams_per_worker)
    m = bounds.this_machine()
    allowed = int(m.memory_bytes * bounds.MEMORY_FRACTION)
    if resident * per_stream > allowed:
        label = f"--spec {args.spec}" if args.spec is not None else f"--streams {len(streams)}"
        raise UsageError(
            f"{label}: {resident} streams at once hold about {resident * per_stream / 1e9:.1f} GB "
            f"({per_stream / 1e6:.1f} MB each: {parts}), more than "
            f"{bounds.MEMORY_FRACTION:.0%} of this machine's {m.memory_bytes / 1e9:.1f} GB; at most "
            f"{allowed // per_stream} fit (or cap them with --streams-per-worker, or use --address)"
        )


def load_spec_file(path: str) -> list[dict]:
    """Stream entries of a TOML or JSON spec file (chosen by suffix; other suffixes: JSON, then TOML)."""
    p = check_input_file("spec file", path)
    text = p.read_text(errors="replace")
    parsers = {".toml": [tomllib.loads], ".json": [json.loads]}.get(p.suffix.lower(), [json.loads, tomllib.loads])
    data, errors = None, []
    for parse in parsers:
        try:
            data = parse(text)
            break
        except (ValueError, tomllib.TOMLDecodeError) as e:  # JSONDecodeError is a ValueError
            errors.append(str(e).splitlines()[0])
        except RecursionError:
            errors.append("nested too deeply")
    if data is None:
        raise UsageError(f"spec file {path} is not valid TOML/JSON: {errors[-1]}")
    streams = data if isinstance(data, list) else data.get("streams") if isinstance(data, dict) else None
    if not isinstance(streams, list) or not streams or not all(isinstance(s, dict) for s in streams):
        raise UsageError(f"spec file {path} needs a non-empty list `streams` of tables/objects")
    if len(streams) > bounds.MAX_STREAMS:
        raise UsageError(f"spec file {path} has {len(streams)} streams; at most {bounds.MAX_STREAMS} per run")
    return streams


def _check_spec_entry(i: int, s: dict, chunks) -> None:
    unknown = set(s) - {"id", "seed", "prompt", "chunks", "trajectory", "world"}
    if unknown:
        raise UsageError(
            f"stream {i}: unknown keys {sorted(unknown)} (allowed: id, seed, prompt, chunks, trajectory, world)"
        )
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks <= 0):
        raise UsageError(f"stream {s.get('id')!r}: chunks must be a positive integer, got {chunks!r}")
    if chunks is not None:
        check_value(f"stream {s.get('id')!r}: chunks", chunks, bounds.CHUNKS)
    for key in ("seed", "world"):
        if s.get(key) is not None:
            check_value(f"stream {i}: {key}", s[key], bounds.SEED)
    check_prompt(f"stream {i}: prompt", str(s.get("prompt", "")))


def build_streams(args, world: WorldChoice) -> list[StreamEntry]:
    default_chunks = None if args.infinite else (args.chunks if args.chunks is not None else 12)
    if args.spec is not None:
        raw = load_spec_file(args.spec)
    else:
        n = 3 if args.streams is None else args.streams
        check_value("--streams", n, bounds.STREAMS)
        raw = [{"id": f"s{i}", "seed": args.seed + i, "prompt": args.prompt} for i in range(n)]
    out, seen = [], set()
    for i, s in enumerate(raw):
        chunks = s.get("chunks", default_chunks)
        _check_spec_entry(i, s, chunks)
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


def _check_out(args) -> None:
    """The output directory (and local checkpoint / memory locations) can be written. Raises UsageError."""
    out = Path(args.out)
    if (out / RUN_FILE).exists():
        raise UsageError(f"{out} already holds a run; continue it with `longroll resume --out {out}`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output directory {out} exists and is not empty")
    check_writable_location("output directory", args.out)
    for flag in ("checkpoint_uri", "memory_uri"):
        if getattr(args, flag) is not None:
            check_writable_location("--" + flag.replace("_", "-"), getattr(args, flag))


def build_run_spec(args, check_out: bool = True) -> RunSpec:
    """Validate the run options into a RunSpec. Raises UsageError; writes nothing."""
    check_flags(args, bounds.RUN_FLAGS)
    check_prompt("--prompt", args.prompt)
    _check_dashboard_hosts(args)
    _check_workers(args)
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
    if cfg.family == "wan":  # with a VAE: mp4 segments + latent sidecars; without: latent segments
        cfg, source = wan_source(args, cfg)
        world = WorldChoice(source.weights or "random", "", (), None)
        if source.vae is not None and args.group_size > 1:
            raise UsageError("--vae: generator groups (--group-size > 1) do not decode video yet; use --group-size 1")
    else:
        world = world_choice(args, cfg)
    if args.decode_actors and (source is None or source.vae is None):
        raise UsageError("--decode-actors needs a wan preset with a VAE (--vae, or a pipeline folder as --weights)")
    check_upscaled_frame(cfg, args.upscale)
    streams = build_streams(args, world)
    _check_stream_memory(args, cfg, streams, seg)
    budget = budget_overrides(args)
    check_budget(cfg, budget)
    out = Path(args.out)
    if check_out:
        _check_out(args)
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
        upscale=args.upscale if cfg.family != "wan" else 1,  # Wan video is written at the VAE's size
        lossless=args.lossless,
        decode_actors=args.decode_actors,
        checkpoint_uri=args.checkpoint_uri,
        memory_uri=args.memory_uri,
        memory_budget=budget,
        stub=args.stub,
        dashboard_host=args.dashboard_host,
        dashboard_port=None if args.no_dashboard else args.dashboard_port,
        dashboard_allow_hosts=list(args.dashboard_allow_host),
        stall_timeout_s=args.stall_timeout,
    )
