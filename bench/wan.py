"""Wan-family rollout benchmark: ms per chunk, latent and video frames/s, peak memory, cache bytes per frame.

    python bench/wan.py [--shape tiny|small|real] [--streams 1,4] [--chunks 6] [--threads N]

Runs the real rollout engine (Generator.step: 4 re-noising steps + the re-cache pass) on a seeded
random Wan model, at tiny or small shapes on a CPU and at Wan2.1-T2V-1.3B shapes (480x832, bf16,
SDPA) on a GPU. Video frames/s counts 4 video frames per latent frame (the VAE's temporal stride), the
way Self-Forcing reports its ~17 FPS on one H100. Prints tables; figures go to docs/BENCHMARKS.md by
hand with machine, date and command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.generator import Generator  # noqa: E402
from workers.types import StreamSpec  # noqa: E402

SHAPES = {
    # REAL_MODELS.md's tiny test model: 16 tokens per latent frame
    "tiny": dict(latent_channels=4, latent_height=8, latent_width=8, dim=24, num_heads=2, num_layers=2, ffn_dim=32,
                 cond_dim=16, freq_dim=16),
    # Wan's head width (128) and text width at a CPU-sized depth and frame: 64 tokens per latent frame
    "small": dict(latent_height=16, latent_width=16, dim=256, num_heads=2, num_layers=4, ffn_dim=1024),
    "real": {},  # the preset's own: Wan2.1-T2V-1.3B at 480x832, 1560 tokens per latent frame
}  # fmt: skip


def measure(cfg: ModelConfig, streams: int, chunks: int, device: str) -> dict:
    gen = Generator(cfg, device=device)
    states = [gen.new_stream(StreamSpec(f"s{i}", seed=i, prompt=f"prompt {i}")) for i in range(streams)]
    gen.step(states)  # warm-up: text K/V, allocator, kernels
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        gen.step(states)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    latent_fps = streams * cfg.frames_per_chunk / (ms / 1e3)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss
    text_kv = sum(k.nbytes + v.nbytes for t in gen.family._texts.values() for k, v in t.kv.values()) / streams
    return {
        "ms_per_step": ms,
        "latent_fps": latent_fps,
        "video_fps": latent_fps * cfg.vae_stride[0],
        "peak_bytes": peak,
        "cache_bytes_per_frame": cfg.cache_layout().bytes_per_token() * cfg.tokens_per_frame,
        "cache_bytes_per_stream": states[0].cache.nbytes(),
        "text_kv_bytes_per_stream": text_kv,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--preset", default="self-forcing-1.3b")
    ap.add_argument("--streams", default="1,4", help="comma-separated stream counts per generator")
    ap.add_argument("--chunks", type=int, default=6, help="timed chunks per configuration (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bf16" if device == "cuda" else "fp32"
    cfg = ModelConfig.from_name(args.preset, **SHAPES[args.shape], dtype=dtype, cache_dtype=dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    print(f"device: {name}; torch {torch.__version__}; {args.preset} at {args.shape} shapes: dim {cfg.dim}, "
          f"{cfg.num_layers} layers, {cfg.tokens_per_frame} tokens/frame, {cfg.dtype}")  # fmt: skip
    rows, base = [], None
    for n in (int(s) for s in args.streams.split(",")):
        r = measure(cfg, n, args.chunks, device)
        base = base or r["latent_fps"]
        rows.append([
            n, f"{r['ms_per_step']:.1f}", f"{r['latent_fps']:.2f}", f"{r['video_fps']:.2f}",
            f"{r['latent_fps'] / base:.2f}", f"{r['peak_bytes'] / 2**20:.0f}",
            f"{r['cache_bytes_per_frame'] / 1e6:.3f}", f"{r['cache_bytes_per_stream'] / 1e6:.1f}",
            f"{r['text_kv_bytes_per_stream'] / 1e6:.1f}",
        ])  # fmt: skip
    table(
        f"Wan-family rollout, {args.preset} at {args.shape} shapes on {name} (median of {args.chunks} steps)",
        ["streams", "ms/step", "latent fr/s", "video fr/s", "fr/s vs 1 stream",
         "peak MiB (GPU alloc | CPU RSS)", "cache MB/frame", "cache MB/stream", "text K/V MB/stream"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
