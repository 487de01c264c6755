"""Memory writer: process RSS over many commits, and store disk per row between and after maintenance.

    python bench/store_rss.py [--streams 4] [--rounds 600] [--rows-per-commit 4] [--disk-rows 12000]
        [--disk-rows-per-commit 16] [--shape 3,3,32,32] [--fragment-target-mib M] [--keep-versions K]
        [--compact-every N] [--lance-cache-mib M] [--skip-rss] [--skip-disk] [--dir DIR]

RSS: one ``MemoryWriter`` (default config unless overridden, background maintenance on) commits
``--rounds`` rounds; a round puts ``--rows-per-commit`` chunks into each of ``--streams`` streams and
flushes (one merge_insert per stream: streams x rounds commits). Process RSS (psutil), its anonymous part
(/proc/self/status), the LanceDB session's cache bytes and the thread count are sampled 20 times; the
summary gives RSS after a warm-up of a quarter of the run, at the end and after ``close()``, and the
least-squares slope (MiB per 1,000 commits) over the last three quarters.

Disk: a fresh store, one stream, ``--disk-rows`` rows committed ``--disk-rows-per-commit`` at a time with
background maintenance; after every commit the table directory is summed. Printed: the largest
disk/payload ratio between passes once the table holds a quarter of its rows (and the largest share of
the bound of ``memory_store.maintenance.disk_overhead_bound`` at the size of the moment), the ratio after
a closing ``maintain()``, its parts (data, _versions, _transactions, _indices, _deletions) and the bound.
The payload of a row is its float16 latents plus its float32 embedding. Payloads are seeded random
(incompressible), as generated latents are.

The script needs only the writer's public API, so the same command also measures an older checkout.
Figures are one run's, printed as tables; docs/memory_store.md quotes them with machine, date, command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from memory_store.config import MemoryStoreConfig  # noqa: E402
from memory_store.schema import ChunkRecord  # noqa: E402
from memory_store.writer import MemoryWriter  # noqa: E402

DIM = 64
MIB = 2**20


def tree_bytes(root: Path) -> dict[str, int]:
    """Bytes under ``root`` by first-level entry (a Lance table: data, _versions, _transactions, ...)."""
    out: dict[str, int] = {}
    if not root.exists():
        return out
    for entry in root.iterdir():
        paths = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        total = 0
        for p in paths:
            with contextlib.suppress(FileNotFoundError):  # removed by a concurrent cleanup
                total += p.stat().st_size
        out[entry.name] = total
    return out


def records(stream: str, start: int, n: int, shape, gen: torch.Generator, rng: np.random.Generator):
    for ci in range(start, start + n):
        emb = rng.standard_normal(DIM).astype(np.float32)
        latents = torch.randn(*shape, generator=gen)
        yield ChunkRecord(stream, ci, ci * shape[0], shape[0], emb / np.linalg.norm(emb), latents, "m0")


def rss_anon_mib() -> float | None:
    """Anonymous resident memory (heap, stacks; not mapped files such as library code), Linux only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def session_bytes(cfg: MemoryStoreConfig) -> float | None:
    try:
        from memory_store.db import session
    except ImportError:  # an older checkout: LanceDB's default session, not reachable
        return None
    return session(cfg).size_bytes / MIB


def slope_per_1000(xs: list[int], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0]) * 1000


def store_config(args, uri: Path) -> MemoryStoreConfig:
    """The default config (64-float embeddings, batches of 64) with the command line's overrides."""
    over = {}
    if args.fragment_target_mib:
        over["fragment_target_bytes"] = int(args.fragment_target_mib * MIB)
    if args.keep_versions:
        over["keep_versions"] = args.keep_versions
    if args.compact_every:
        over["compact_every_n_commits"] = args.compact_every
    if args.lance_cache_mib:
        over["lance_index_cache_bytes"] = over["lance_metadata_cache_bytes"] = int(args.lance_cache_mib * MIB)
    return MemoryStoreConfig(uri=str(uri), embedding_dim=DIM, batch_size=64, flush_interval_s=0.01, **over)


def rss_run(args, root: Path, shape) -> None:
    proc = psutil.Process()
    cfg = store_config(args, root / "rss")
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    rss0 = proc.memory_info().rss / MIB
    every = max(1, args.rounds // 20)
    samples: list[tuple[int, float, float | None, float | None, int]] = []
    t0 = time.perf_counter()
    w = MemoryWriter(cfg)
    for r in range(args.rounds):
        for s in range(args.streams):
            for rec in records(f"s{s}", r * args.rows_per_commit, args.rows_per_commit, shape, gen, rng):
                w.put(rec)
        w.flush()
        if (r + 1) % every == 0 or r == args.rounds - 1:
            samples.append(
                (w.stats.commits, proc.memory_info().rss / MIB, rss_anon_mib(), session_bytes(cfg), proc.num_threads())
            )
    w.wait_maintenance(600)
    end = proc.memory_info().rss / MIB
    passes = w._maintainer.passes
    w.close()
    closed = proc.memory_info().rss / MIB
    wall = time.perf_counter() - t0
    table(
        f"Writer RSS: {args.streams} streams x {args.rounds} rounds of {args.rows_per_commit} chunks, fragment target "
        f"{getattr(cfg, 'fragment_target_bytes', 0) / MIB:g} MiB "
        f"({samples[-1][0]:,} commits, {passes} maintenance passes, {wall:.0f} s); RSS at start {rss0:.0f} MiB",
        ["commits", "RSS MiB", "of it anonymous", "LanceDB session MiB", "threads"],
        [
            [f"{c:,}", f"{m:.0f}", "n/a" if a is None else f"{a:.0f}", "n/a" if s is None else f"{s:.1f}", t]
            for c, m, a, s, t in samples
        ],
    )
    q = len(samples) // 4
    tail = samples[q:]
    anon = [a for _, _, a, *_ in tail]
    table(
        "Writer RSS summary",
        ["RSS after warm-up (1/4)", "RSS at end", "after close()", "slope over last 3/4", "per commit",
         "anonymous RSS slope"],
        [[
            f"{samples[q][1]:.0f} MiB", f"{end:.0f} MiB", f"{closed:.0f} MiB",
            f"{slope_per_1000([c for c, *_ in tail], [m for _, m, *_ in tail]):+.1f} MiB / 1k commits",
            f"{(end - samples[q][1]) / max(1, samples[-1][0] - samples[q][0]) * 1e3:+.1f} KiB",
            "n/a" if None in anon else f"{slope_per_1000([c for c, *_ in tail], anon):+.1f} MiB / 1k commits",
        ]],
    )  # fmt: skip


def disk_run(args, root: Path, shape) -> None:
    cfg = store_config(args, root / "disk")
    table_dir = Path(cfg.uri) / "chunks_d.lance"
    row_payload = int(np.prod(shape)) * 2 + DIM * 4
    gen, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    try:
        from memory_store.maintenance import disk_overhead_bound
    except ImportError:  # an older checkout
        disk_overhead_bound = None
    worst, worst_at, worst_of_bound = 0.0, 0, 0.0
    t0 = time.perf_counter()
    with MemoryWriter(cfg) as w:
        for start in range(0, args.disk_rows, args.disk_rows_per_commit):
            n = min(args.disk_rows_per_commit, args.disk_rows - start)
            for rec in records("d", start, n, shape, gen, rng):
                w.put(rec)
            w.flush()
            rows = start + n
            if rows >= args.disk_rows // 4:
                ratio = sum(tree_bytes(table_dir).values()) / (rows * row_payload)
                if ratio > worst:
                    worst, worst_at = ratio, rows
                if disk_overhead_bound is not None:
                    worst_of_bound = max(worst_of_bound, ratio / disk_overhead_bound(cfg, row_payload, rows))
        w.wait_maintenance(600)
        passes = w._maintainer.passes
        before = sum(tree_bytes(table_dir).values())
        w.maintain("d")
    wall = time.perf_counter() - t0
    parts = tree_bytes(table_dir)
    total = sum(parts.values())
    payload = args.disk_rows * row_payload
    if disk_overhead_bound is not None:
        bound = f"{disk_overhead_bound(cfg, row_payload, args.disk_rows):.2f}x"
        asym = f"{disk_overhead_bound(cfg, row_payload):.3f}x"
        of_bound = f"{worst_of_bound:.0%}"
    else:
        bound = asym = of_bound = "n/a"
    commits = -(-args.disk_rows // args.disk_rows_per_commit)
    table(
        f"Store disk, one stream: {args.disk_rows:,} rows of {row_payload:,} B payload in {commits:,} commits of "
        f"{args.disk_rows_per_commit}, {passes} background passes ({wall:.0f} s); payload {payload / MIB:.1f} MiB; "
        f"fragment target {getattr(cfg, 'fragment_target_bytes', 0) / MIB:g} MiB, keep_versions {cfg.keep_versions}, "
        f"a pass every {cfg.compact_every_n_commits} commits",
        ["worst between passes (rows >= 1/4)", "worst share of the bound", "before final maintain",
         "after final maintain", "B per row after", "bound at the end", "bound, long stream"],
        [[f"{worst:.2f}x (at {worst_at:,} rows)", of_bound, f"{before / payload:.2f}x", f"{total / payload:.3f}x",
          f"{total / args.disk_rows:,.0f}", bound, asym]],
    )  # fmt: skip
    table(
        "Store disk after maintenance, by part (bytes per row)",
        list(parts),
        [[f"{v / args.disk_rows:,.0f}" for v in parts.values()]],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--rows-per-commit", type=int, default=4)
    ap.add_argument("--disk-rows", type=int, default=12_000)
    ap.add_argument("--disk-rows-per-commit", type=int, default=16)
    ap.add_argument("--shape", default="3,3,32,32", help="latents of a chunk, F,C,H,W (default: tiny preset)")
    ap.add_argument("--fragment-target-mib", type=float, default=None, help="fragment_target_bytes (both runs)")
    ap.add_argument("--keep-versions", type=int, default=None, help="keep_versions (both runs)")
    ap.add_argument("--compact-every", type=int, default=None, help="compact_every_n_commits (both runs)")
    ap.add_argument("--lance-cache-mib", type=float, default=None, help="each LanceDB cache (both runs)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-disk", action="store_true")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 4 or min(shape) < 1 or min(args.streams, args.rounds, args.rows_per_commit) < 1:
        ap.error("--shape needs 4 positive ints; --streams, --rounds, --rows-per-commit must be >= 1")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    root = Path(tempfile.mkdtemp(prefix="store_rss_", dir=args.dir))
    try:
        if not args.skip_rss:
            rss_run(args, root, shape)
        if not args.skip_disk:
            disk_run(args, root, shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\n{platform.platform()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"torch {torch.__version__}; MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}"
    )


if __name__ == "__main__":
    main()
