"""Streaming Wan VAE decode benchmark: ms per chunk, memory per stream, resume error vs warm-up length K.

    python bench/vae.py [--size 128x128] [--streams 1,4] [--chunks 4] [--sweep tiny,real] [--ks 0,8,..]
                        [--modes rep,start] [--threads N]
    python bench/vae.py --device cuda          # Wan2.1 VAE architecture, random weights, 480x832, bf16

1. Decode time of one chunk (3 latent frames -> 12 video frames) per stream, with 1 and 4 streams
   (each its own StreamDecoder, decoded one after another), and the peak memory growth per stream
   (CPU: peak RSS; CUDA: peak allocated). CPU: REAL_MODELS.md's tiny VAE, every parameter random.
   Each stream count runs in a fresh process; "per stream past 1" is the growth an added stream brings.
2. Resume error vs K: warm up an EMPTY cache on the K latent frames before a resume point, decode
   the next chunk, compare with the uninterrupted decode (max |diff| in uint8 and in float, and
   whether the rebuilt cache is bit-identical). "rep" is StreamDecoder.warmup (non-first mode);
   "start" replays the K frames as if they began the stream. CPU fp32, random weights, 32x32 px;
   "real" is the Wan2.1 architecture (z_dim 16, base_dim 96) and takes minutes on 2 cores.
3. decoder_cache_bytes of the real config at 480x832 in bf16 (REAL_MODELS.md: "about 1.8 GiB").
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from workers.models.wan.vae import (  # noqa: E402
    RESUME_LATENT_FRAMES,
    TINY_VAE_CONFIG,
    StreamDecoder,
    decoder_cache_bytes,
    random_vae,
    to_uint8,
    wan21_vae_config,
)

CHUNK = 3  # latent frames per chunk (Self-Forcing / CausVid / LongLive)
# K swept by default (each K replays K latent frames from an empty cache): about 12 s (tiny) / 4.5 min (real)
# on 2 CPU cores
SWEEP_KS = {
    "tiny": [0, 2, 4, 8, 12, 16, 20, 24, 26, 28, 29, 30, 31, 32, 34, 38],
    "real": [0, 8, 16, 24, 32, 36, 37, 38, 39],
}


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timing(real: bool, device: str, size: tuple[int, int], streams: int, chunks: int, threads: int | None) -> dict:
    """ms per chunk per stream (median), peak memory growth for all streams, cache bytes per stream.

    Runs in a fresh (spawned) process per stream count, so the peak of one count does not hide the next.
    The growth is measured from after the VAE is built: every stream's cache plus the decode's transient
    buffers, which the streams share (they decode one after another).
    """
    if threads:
        torch.set_num_threads(threads)
    config = wan21_vae_config() if real else TINY_VAE_CONFIG
    vae = random_vae(config, seed=0, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(streams)
    lat = [torch.randn(CHUNK * (chunks + 1), config["z_dim"], size[0] // 8, size[1] // 8, generator=gen)
           for _ in range(streams)]  # fmt: skip
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_bytes(device)
    decs = [StreamDecoder(vae) for _ in range(streams)]
    for d, x in zip(decs, lat):  # the first chunk (1 + 4 * 2 frames), not timed
        d.decode(x[:CHUNK])
    times = []
    for c in range(1, chunks + 1):
        for d, x in zip(decs, lat):
            sync(device)
            t0 = time.perf_counter()
            d.decode(x[c * CHUNK : (c + 1) * CHUNK])
            sync(device)
            times.append(time.perf_counter() - t0)
    return dict(ms=statistics.median(times) * 1e3, growth=peak_bytes(device) - base, cache=decs[0].cache_nbytes())


def sweep(vae, latents: torch.Tensor, t: int, ks: list[int], modes: tuple[str, ...]) -> list[list]:
    """Rows [K, per mode: max |uint8 diff|, max |float diff|, cache bit-identical] for a resume at latent frame t."""
    ref = StreamDecoder(vae)
    ref.decode_float(latents[:t])
    ref_cache = [c.clone() if isinstance(c, torch.Tensor) else c for c in ref._cache]
    want = ref.decode_float(latents[t : t + CHUNK])
    rows = []
    for k in ks:
        row = [k]
        for mode in modes:
            if mode == "start" and k == 0:
                row += ["-", "-", "-"]
                continue
            d = StreamDecoder(vae)
            d.warmup(latents[t - k : t], starts_stream=mode == "start", frames=k)
            same = all(
                (type(a) is type(b) and (not isinstance(a, torch.Tensor) or torch.equal(a, b)))
                for a, b in zip(d._cache, ref_cache)
            )
            got = d.decode_float(latents[t : t + CHUNK])
            u8 = (to_uint8(got).int() - to_uint8(want).int()).abs().max().item()
            row += [u8, f"{(got - want).abs().max().item():.3g}", "yes" if same else "no"]
        rows.append(row)
    return rows


def run_sweep(name: str, config: dict, ks: list[int], modes: tuple[str, ...]) -> None:
    vae = random_vae(config, seed=0)
    t = max(ks) + 2
    latents = torch.randn(t + CHUNK, config["z_dim"], 4, 4, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    rows = sweep(vae, latents, t, ks, modes)
    exact = [r[0] for r in rows if r[1] == 0 and r[3] == "yes"]
    head = ["K"] + [f"{m}: {c}" for m in modes for c in ("max |d| uint8", "max |d| float", "cache equal")]
    table(f"Resume after warmup(K) vs uninterrupted, {name} VAE, CPU fp32, 32x32 px, resume at latent frame {t}, "
          f"next {CHUNK} latent frames ({time.perf_counter() - t0:.0f} s)", head, rows)  # fmt: skip
    print(f"smallest K with bit-identical frames and cache ({modes[0]}): {min(exact) if exact else 'none'}; "
          f"RESUME_LATENT_FRAMES = {RESUME_LATENT_FRAMES}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", default=None, help="HxW pixels (default 128x128 on cpu, 480x832 on cuda)")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--chunks", type=int, default=4, help="timed chunks per stream (after the first)")
    ap.add_argument("--sweep", default="tiny", help="comma list of tiny,real ('' to skip)")
    ap.add_argument("--ks", default=None, help="comma list of warm-up lengths K to sweep (default per model)")
    ap.add_argument("--modes", default="rep", help="comma list of rep,start (see above)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    h, w = (int(v) for v in (args.size or ("480x832" if dev == "cuda" else "128x128")).split("x"))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    which = "Wan2.1 VAE (z_dim 16, base_dim 96)" if dev == "cuda" else "tiny VAE (REAL_MODELS.md)"
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; {which}, random "
          f"weights, {h}x{w} px, {dtype}")  # fmt: skip

    rows, first = [], None
    for n in (int(s) for s in args.streams.split(",") if s):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            r = ex.submit(timing, dev == "cuda", dev, (h, w), n, args.chunks, args.threads).result()
        first = first or (n, r["growth"])
        marginal = (r["growth"] - first[1]) / (n - first[0]) if n != first[0] else None
        rows.append([n, f"{r['ms']:.1f}", f"{4 * CHUNK / (r['ms'] / 1e3):.1f}", f"{r['growth'] / 2**20:.1f}",
                     f"{r['growth'] / n / 2**20:.1f}", "-" if marginal is None else f"{marginal / 2**20:.1f}",
                     f"{r['cache'] / 2**20:.2f}"])  # fmt: skip
    mem = "GPU alloc" if dev == "cuda" else "CPU RSS"
    table(f"StreamDecoder.decode of one chunk ({CHUNK} latent -> {4 * CHUNK} video frames) per stream, {h}x{w}, "
          f"median of {args.chunks} chunks x streams, streams decoded one after another",
          ["streams", "ms/chunk/stream", "video fr/s/stream", f"peak growth MiB ({mem}, all streams)",
           "... / streams", f"... per stream past {first[0] if first else '-'}", "cache MiB/stream"], rows)  # fmt: skip

    modes = tuple(args.modes.split(","))
    for s in (s for s in args.sweep.split(",") if s):
        if s not in SWEEP_KS:
            raise SystemExit(f"unknown sweep {s!r}")
        ks = [int(k) for k in args.ks.split(",")] if args.ks else SWEEP_KS[s]
        run_sweep("tiny" if s == "tiny" else "Wan2.1-architecture", TINY_VAE_CONFIG if s == "tiny" else
                  wan21_vae_config(), ks, modes)  # fmt: skip

    real = wan21_vae_config()
    rows = [[f"{hh}x{ww}", str(d).replace("torch.", ""), f"{decoder_cache_bytes(real, hh, ww, d) / 2**30:.3f}"]
            for hh, ww in ((480, 832), (720, 1280)) for d in (torch.bfloat16, torch.float32)]  # fmt: skip
    table("decoder_cache_bytes, Wan2.1 VAE config (meta device, nothing allocated); REAL_MODELS.md: about 1.8 GiB "
          "at 480x832 bf16", ["pixels", "dtype", "GiB/stream"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
