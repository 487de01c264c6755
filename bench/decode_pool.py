"""Where should the Wan VAE decode run: in the worker after each chunk, or in a pool of decode actors?

One `longroll run` per configuration (1 and 4 streams, decode in the worker vs `--decode-actors 1`),
a tiny random Wan transformer and the tiny random VAE on one worker, lossless mp4. Timed from the first
stream's assignment to the run's end (events.jsonl), so Ray's start and the model load are left out.

    python bench/decode_pool.py [--chunks 12] [--size 128] [--streams 1,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.workers.wan.models import random_transformer, tiny_cfg  # noqa: E402
from workers.models.wan.vae import TINY_VAE_CONFIG, random_vae  # noqa: E402


def parts(tmp: Path) -> tuple[Path, Path, Path]:
    weights, vae, embeds = tmp / "wan", tmp / "vae", tmp / "pe.safetensors"
    random_transformer(tiny_cfg(), seed=3).save_pretrained(weights)
    random_vae(TINY_VAE_CONFIG, seed=4).save_pretrained(vae)
    save_file({"prompt_embeds": torch.randn(7, 16, generator=torch.Generator().manual_seed(5))}, str(embeds))
    return weights, vae, embeds


def run_once(tmp: Path, streams: int, actors: int, chunks: int, size: int, p: tuple[Path, Path, Path]) -> float:
    out = tmp / f"run-{streams}-{actors}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--preset", "self-forcing-1.3b", "--weights", str(p[0]),
           "--vae", str(p[1]), "--prompt-embeds", str(p[2]), "--dtype", "fp32", "--height", str(size), "--width",
           str(size), "--streams", str(streams), "--chunks", str(chunks), "--workers", "1", "--checkpoint-every", "4",
           "--decode-actors", str(actors), "--lossless", "--no-dashboard", "--quiet", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    ev = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = min(e["time"] for e in ev if e["event"] == "stream.assigned")
    end = max(e["time"] for e in ev if e["event"] == "run.finished")
    return end - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--size", type=int, default=128, help="frame side in pixels")
    ap.add_argument("--streams", default="1,4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        p = parts(tmp)
        print(f"tiny Wan + tiny VAE, {args.size}x{args.size} px, {args.chunks} chunks per stream, 1 worker, CPU")
        print(f"{'streams':>7} {'decode':>14} {'seconds':>8} {'chunks/s':>9} {'vs worker':>9}")
        for n in [int(s) for s in args.streams.split(",")]:
            base = None
            for actors in (0, 1):
                sec = run_once(tmp, n, actors, args.chunks, args.size, p)
                rate = n * args.chunks / sec
                base = base or rate
                where = "in worker" if actors == 0 else f"{actors} actor(s)"
                print(f"{n:>7} {where:>14} {sec:>8.1f} {rate:>9.2f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
