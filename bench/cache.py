"""Cache benchmark: bytes per token (MHA vs MLA bf16 vs MLA fp8), tiny-preset frames/s for mha vs mla
on this CPU, and resident memory of a long rollout (constant memory is the point of a fixed cache).

    python bench/cache.py [--frames 10000] [--fps-frames 600] [--threads N]

Prints tables; figures go to docs/BENCHMARKS.md by hand with machine, date and command.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.generator import Generator  # noqa: E402
from workers.types import StreamSpec  # noqa: E402


def bytes_table() -> None:
    rows = []
    for preset in ("tiny", "wan-1.3b"):
        base = ModelConfig.from_name(preset)
        mha = replace(base, attention="mha", cache_dtype="bf16").cache_layout()
        variants = [
            ("MHA bf16", mha),
            ("MLA bf16", replace(base, attention="mla", cache_dtype="bf16").cache_layout()),
            ("MLA fp8 (scale/token)", replace(base, attention="mla", cache_dtype="fp8").cache_layout()),
            (
                "MLA fp8 (scale/frame)",
                replace(base, attention="mla", cache_dtype="fp8", fp8_scale="frame").cache_layout(),
            ),
        ]
        for name, lay in variants:
            per_layer = lay.bytes_per_token_per_layer()
            red = 100 * (1 - lay.bytes_per_token() / mha.bytes_per_token())
            rows.append(
                [
                    preset,
                    name,
                    f"{lay.width}",
                    f"{per_layer:.2f}",
                    f"{lay.bytes_per_token():,.0f}",
                    f"{lay.bytes_per_token() * lay.tokens_per_frame / 1e6:.2f}",
                    f"{red:.2f}%",
                ]
            )
    table(
        "Cache bytes per token (d_c + d_r for MLA; 2 * H * D for MHA)",
        [
            "preset",
            "cache",
            "row width",
            "B/token/layer",
            "B/token (all layers)",
            "MB/latent frame",
            "reduction vs MHA",
        ],
        rows,
    )


def fps_table(frames: int, repeats: int) -> None:
    gens = {}
    for att in ("mha", "mla"):
        g = Generator(ModelConfig.from_name("tiny", attention=att))
        st = g.new_stream(StreamSpec("bench", seed=1))
        for _ in range(3):  # warm-up
            g.step([st])
        gens[att] = (g, st)
    per_chunk = ModelConfig.from_name("tiny").frames_per_chunk
    chunks = max(1, frames // per_chunk)
    results = {att: [] for att in gens}
    for _ in range(repeats):  # interleaved so that machine noise hits both alike
        for att, (g, st) in gens.items():
            t0 = time.perf_counter()
            for _ in range(chunks):
                g.step([st])
            results[att].append(chunks * per_chunk / (time.perf_counter() - t0))
    best = {att: max(v) for att, v in results.items()}
    rows = [
        [
            att,
            f"{best[att]:.1f}",
            f"{sorted(results[att])[len(results[att]) // 2]:.1f}",
            f"{gens[att][1].cache.nbytes() / 1e6:.3f}",
            f"{best[att] / best['mha']:.2f}",
        ]
        for att in gens
    ]
    table(
        f"tiny preset, one stream, {chunks * per_chunk} frames x {repeats} interleaved runs, "
        f"{torch.get_num_threads()} threads",
        ["attention", "frames/s (best)", "frames/s (median)", "cache MB/stream", "ratio vs mha"],
        rows,
    )


def rss_table(total_frames: int) -> None:
    proc = psutil.Process(os.getpid())
    rows = []
    for att in ("mla", "mha"):
        g = Generator(ModelConfig.from_name("tiny", attention=att))
        st = g.new_stream(StreamSpec("rss", seed=2))
        marks = {1_000: None, total_frames: None}
        t0 = time.perf_counter()
        while st.frames_done < total_frames:
            g.step([st])
            for m in marks:
                if marks[m] is None and st.frames_done >= m:
                    gc.collect()
                    marks[m] = proc.memory_info().rss
        secs = time.perf_counter() - t0
        r1, rn = marks[1_000], marks[total_frames]
        rows.append(
            [
                att,
                f"{r1 / 2**20:.1f}",
                f"{rn / 2**20:.1f}",
                f"{100 * (rn - r1) / r1:+.2f}%",
                f"{st.frames_done / secs:.1f}",
            ]
        )
        del g, st
        gc.collect()
    table(
        f"Resident memory of one tiny stream (process RSS, MiB) after 1,000 and {total_frames:,} frames",
        ["attention", "RSS @1k", f"RSS @{total_frames // 1000}k", "change", "frames/s over the run"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10_000, help="length of the resident-memory rollout")
    ap.add_argument("--fps-frames", type=int, default=600, help="frames per timed run of the fps table")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per attention kind")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; torch {torch.__version__}"
    )
    bytes_table()
    fps_table(args.fps_frames, args.repeats)
    rss_table(args.frames)


if __name__ == "__main__":
    main()
