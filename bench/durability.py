"""Durability benchmark: what the fsyncs of workers.durable cost per commit, with them and without.

Times N of each commit a rollout makes, each once with ``durable=True`` (production: fsync of the
file and of its directory) and once with ``durable=False`` (rename only), interleaved in one run so
both see the same disk and the same neighbours:

- manifest write: ``write_json_atomic`` of a stream manifest listing 64 segments;
- checkpoint save: ``CheckpointStore.save`` of a tiny-preset stream state (the real ~0.7 MB
  safetensors payload, after a few chunks), keep 3;
- mp4 segment commit: sha256 of a finished 8-chunk tiny-preset mp4 (lossless, upscale 4, the
  worker's defaults) plus ``commit_file``; the encode itself is outside the timer;
- latent segment commit: sha256 plus ``write_atomic`` of an 8-chunk latent segment's bytes.

    python bench/durability.py [--n 50] [--dir DIR]

Prints the directory's filesystem (``df -T``) and a table of median ms per op and the ratio;
figures go to docs/BENCHMARKS.md by hand with machine, date and command.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from workers.checkpoints import CheckpointStore  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.durable import commit_file, file_sha256, write_atomic  # noqa: E402
from workers.generator import Generator  # noqa: E402
from workers.latent_segments import LatentSegmentWriter  # noqa: E402
from workers.output import write_json_atomic  # noqa: E402
from workers.types import StreamSpec  # noqa: E402
from workers.video import Mp4Writer  # noqa: E402

TINY = ModelConfig.from_name("tiny")
SEGMENT_CHUNKS = 8  # RunSpec's default


def fs_type(d: Path) -> str:
    """``df -T``'s filesystem type column for ``d`` (what the figures were measured on)."""
    try:
        out = subprocess.run(["df", "-T", str(d)], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def manifest(n_segments: int = 64) -> dict:
    segs = [
        {"first": i * 8, "last": i * 8 + 7, "file": f"segments/{i * 8:08d}-{i * 8 + 7:08d}.mp4",
         "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "bytes": 123_456}
        for i in range(n_segments)
    ]  # fmt: skip
    return {"stream_id": "s0", "state": "running", "chunks_done": 8 * n_segments, "segments": segs, "fps": 16}


def rollout(n: int):
    """(stream state after n chunks, its chunks) of the tiny preset."""
    gen = Generator(TINY)
    state = gen.new_stream(StreamSpec("s0", seed=1))
    chunks = [gen.step([state])[0] for _ in range(n)]
    return state, chunks


class Ops:
    """The four commits, each a callable ``op(durable) -> seconds`` writing under its own folder per mode."""

    def __init__(self, root: Path):
        self.root = root
        self.state, self.chunks = rollout(SEGMENT_CHUNKS)
        self.latent_bytes = self._latent_segment()
        self.m = manifest()
        self.stores = {d: CheckpointStore(str(root / f"ckpt-{d}"), "s0", keep=3) for d in (True, False)}
        self.counter = 0
        for d in (True, False):
            (root / f"seg-{d}").mkdir()
        self.sizes: dict[str, int] = {}

    def _latent_segment(self) -> bytes:
        w = LatentSegmentWriter(self.root / "unused.safetensors", 0)
        for c in self.chunks:
            w.write(c.latents)
        return w.to_bytes()

    def manifest(self, durable: bool) -> float:
        path = self.root / f"manifest-{durable}.json"
        t0 = time.perf_counter()
        write_json_atomic(path, self.m, durable=durable)
        dt = time.perf_counter() - t0
        self.sizes["manifest write"] = path.stat().st_size
        return dt

    def checkpoint(self, durable: bool) -> float:
        self.counter += 1
        self.state.next_chunk = self.counter * SEGMENT_CHUNKS  # a new checkpoint folder each time
        t0 = time.perf_counter()
        self.stores[durable].save(self.state, {"memory_table_version": self.counter}, durable=durable)
        dt = time.perf_counter() - t0
        self.sizes["checkpoint save"] = len(self.state.to_bytes()[0])
        return dt

    def mp4_segment(self, durable: bool) -> float:
        d = self.root / f"seg-{durable}"
        w = Mp4Writer(d / ".open.mp4", TINY.fps, upscale=4, crf=0)
        for c in self.chunks:
            w.write(c.frames)
        tmp = w.finish()  # encoded, flushed to the page cache, not yet committed: as in close_segment
        t0 = time.perf_counter()
        digest, size = file_sha256(tmp)
        commit_file(tmp, d / "00000000-00000007.mp4", durable=durable)
        dt = time.perf_counter() - t0
        self.sizes["mp4 segment commit"] = size
        return dt

    def latent_segment(self, durable: bool) -> float:
        target = self.root / f"seg-{durable}" / "00000000-00000007.safetensors"
        t0 = time.perf_counter()
        hashlib.sha256(self.latent_bytes).hexdigest()
        write_atomic(target, self.latent_bytes, durable=durable)
        dt = time.perf_counter() - t0
        self.sizes["latent segment commit"] = len(self.latent_bytes)
        return dt


def measure(ops: Ops, n: int) -> dict[str, dict[bool, list[float]]]:
    """n rounds; each round runs every op in both modes, alternating which mode goes first."""
    named: dict[str, Callable[[bool], float]] = {
        "manifest write": ops.manifest,
        "checkpoint save": ops.checkpoint,
        "mp4 segment commit": ops.mp4_segment,
        "latent segment commit": ops.latent_segment,
    }
    times: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in named}
    for i in range(n):
        order = (True, False) if i % 2 == 0 else (False, True)
        for name, op in named.items():
            for durable in order:
                times[name][durable].append(op(durable))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="commits of each kind per mode (default 50)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder in the system temp dir)")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="longroll-durability-") as tmp:
        root = Path(tmp)
        print(f"writing under {root} (filesystem type {fs_type(root)}), {args.n} commits of each kind per mode")
        ops = Ops(root)
        times = measure(ops, args.n)
    rows = []
    for name, t in times.items():
        on, off = (1e3 * statistics.median(t[d]) for d in (True, False))
        p90 = 1e3 * statistics.quantiles(t[True], n=10)[-1] if len(t[True]) > 1 else on
        rows.append([name, f"{ops.sizes[name]:,}", f"{on:.3f}", f"{p90:.3f}", f"{off:.3f}", f"{on / off:.1f}x"])
    table(
        "Commit cost, median ms per op (durable: fsync file + directory; off: rename only)",
        ["op", "bytes", "durable ms", "durable p90 ms", "no-fsync ms", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
