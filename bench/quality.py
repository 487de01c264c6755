"""Quality benchmark of long-horizon memory with the trained world model (held-out worlds).

    python bench/quality.py [--worlds 3] [--frames 960] [--threads 1] [--out out/bench/quality]
    python bench/quality.py --drift-frames 100000 --drift-mode retrieval [--threads 1]

Every rollout starts from the true view of a held-out world (the prompt chunk) and follows the
``revisit`` trajectory, whose camera leaves places for several legs (far longer than the window) and
comes back to exactly the same poses. The world is static, so the view at a return should equal the
view at the first visit. Modes, all with the same trained weights, the same noise and the same
number of context frames (sink + 12):

- ``window``: sink + 12 local frames, attention computed on per-head K/V up-projected from the cache
  (what an MHA cache would hold; the same math as the next row);
- ``mla window``: the same context attended in latent space (absorbed MLA);
- ``retrieval``: sink + 6 retrieved frames (pose-keyed, from the LanceDB memory store) + 6 local;
- ``sparse``: sink + 6 local + a 24-frame far-history ring read block-sparsely (top 6 blocks per head);
- ``baseline`` (throughput only): sink + 6 local frames, no memory.

Measured:
- revisit consistency: PSNR and SSIM between the generated view at a return and the generated view at
  the first visit of the same pose, binned by how many frames ago that first visit was (only returns
  beyond the window: the camera was last at that pose 16 or more frames before);
- fidelity: PSNR against the true world at returns to the prompt's poses (where the truth was shown);
- throughput: frames/s of each mode over the same frames, and its ratio to the memory-free baseline;
- drift (``--drift-frames``): total-variation distance between the colour histograms of frames
  0-1k and of the last 1k frames of one long rollout, against the spread of the same distance
  between the first 1k frames of different held-out worlds.

Prints tables, saves PNG plots and a JSON of every figure under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.tables import table  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.generator import Generator  # noqa: E402
from workers.logs import configure_logging  # noqa: E402
from workers.types import StreamSpec  # noqa: E402
from workers.weights import resolve  # noqa: E402
from workers.world.data import HELD_OUT_WORLDS  # noqa: E402
from workers.world.trajectory import returns  # noqa: E402

BINS = [(16, 48), (49, 96), (97, 192), (193, 384), (385, 10**9)]


def mode_config(mode: str) -> tuple[ModelConfig, str]:
    base = ModelConfig.from_name("tiny", attention="mla")
    return {
        "window": (replace(base, memory="window", window_frames=12), "upprojected"),
        "mla window": (replace(base, memory="window", window_frames=12), "absorbed"),
        "retrieval": (replace(base, memory="retrieval", memory_frames=6, window_frames=6), "absorbed"),
        "sparse": (replace(base, memory="sparse", window_frames=6, history_frames=24), "absorbed"),
        "baseline": (replace(base, memory="window", window_frames=6), "absorbed"),
    }[mode]


def rollout(mode: str, world: int, frames: int, weights: str, progress: bool = True) -> dict:
    """Generate ``frames`` frames of one held-out world; returns latents, poses and timing."""
    cfg, form = mode_config(mode)
    link, tmp = None, None
    kwargs = {}
    if cfg.memory == "retrieval":
        from workers.memory import MemoryLink, default_embedder

        tmp = tempfile.mkdtemp(prefix="longroll-quality-")
        link = MemoryLink(str(Path(tmp) / "memory"), cfg)
        kwargs = dict(memory=link.retriever, embedder=default_embedder(cfg))
    gen = Generator(cfg, weights=resolve(weights, cfg), mla_form=form, **kwargs)
    spec = StreamSpec(f"w{world % 1000}", seed=world % 1000, trajectory="revisit", world=world)
    state = gen.new_stream(spec)
    out = []
    t_start = None
    n_chunks = math.ceil(frames / cfg.frames_per_chunk)
    try:
        for i in range(n_chunks):
            if i == 2:  # time from the third chunk: model and store warm
                t_start = time.perf_counter()
            (chunk,) = gen.step([state])
            if link is not None:
                link.publish(chunk)
            out.append(chunk.latents)
            if progress and (i + 1) % max(1, n_chunks // 10) == 0:
                print(f"  {mode:>10} world {world}: {min(frames, (i + 1) * 3)}/{frames} frames", flush=True)
        secs = time.perf_counter() - t_start
    finally:
        if link is not None:
            link.close()
            shutil.rmtree(tmp, ignore_errors=True)
    lat = torch.cat(out)[:frames]  # (N, C, H, W)
    idx = torch.arange(frames)
    poses = gen.camera.poses(spec, idx)
    truth = gen.camera.true_views(world, poses)
    return {"latents": lat, "poses": poses, "truth": truth, "fps": (n_chunks - 2) * cfg.frames_per_chunk / secs}


# ---- metrics ---------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of [C, H, W] images in [-1, 1] (Gaussian window 7, sigma 1.5, per channel)."""
    x, y = ((a.clamp(-1, 1) + 1) / 2)[:, None], ((b.clamp(-1, 1) + 1) / 2)[:, None]  # (C, 1, H, W)
    g = torch.exp(-((torch.arange(7) - 3.0) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]  # (1, 1, 7, 7)
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x**2
    syy = F.conv2d(y * y, w) - mu_y**2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def consistency(r: dict) -> dict:
    pairs = returns(r["poses"])
    by_bin = {f"{lo}-{hi}" if hi < 10**9 else f">{lo - 1}": [] for lo, hi in BINS}
    all_p, all_s = [], []
    for t0, t in pairs:
        p, s = psnr(r["latents"][t], r["latents"][t0]), ssim(r["latents"][t], r["latents"][t0])
        all_p.append(p)
        all_s.append(s)
        for (lo, hi), key in zip(BINS, by_bin):
            if lo <= t - t0 <= hi:
                by_bin[key].append((p, s))
    prompt_poses = {tuple(p) for p in r["poses"][:3].tolist()}
    fid = [
        psnr(r["latents"][t], r["truth"][t])
        for t in range(16, len(r["poses"]))
        if tuple(r["poses"][t].tolist()) in prompt_poses
    ]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {
        "pairs": len(pairs),
        "psnr": mean(all_p),
        "ssim": mean(all_s),
        "bins": {
            k: {"n": len(v), "psnr": mean([p for p, _ in v]), "ssim": mean([s for _, s in v])}
            for k, v in by_bin.items()
        },
        "fidelity_psnr": mean(fid),
        "fidelity_frames": len(fid),
        "psnr_vs_truth_all": mean([psnr(a, b) for a, b in zip(r["latents"][3:], r["truth"][3:])]),
    }


def colour_hist(latents: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Per-channel histograms of frames in [-1, 1] -> [C, bins], each row sums to 1."""
    x = ((latents.clamp(-1, 1) + 1) / 2 * (bins - 1e-6)).floor().long()  # (N, C, H, W)
    h = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=bins).float() for c in range(x.shape[1])])
    return h / h.sum(dim=1, keepdim=True)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance between histograms, averaged over channels (0 = same, 1 = disjoint)."""
    return float(0.5 * (p - q).abs().sum(dim=1).mean())


# ---- output ------------------------------------------------------------------------------------------
def cell(b: dict) -> str:
    return "-" if not b["n"] else f"{b['psnr']:.2f} / {b['ssim']:.3f} ({b['n']})"


def plot_consistency(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(next(iter(results.values()))["bins"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for mode, res in results.items():
        xs = [i for i, k in enumerate(keys) if res["bins"][k]["n"]]
        for ax, metric in zip(axes, ("psnr", "ssim")):
            ax.plot(xs, [res["bins"][keys[i]][metric] for i in xs], marker="o", label=mode)
    for ax, label in zip(axes, ("revisit PSNR (dB)", "revisit SSIM")):
        ax.set_xticks(range(len(keys)), keys, fontsize=8)
        ax.set_xlabel("frames since the first visit")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("revisit consistency vs revisit distance (held-out worlds, window = 12 frames)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def save_strip(r: dict, pairs: list[tuple[int, int]], path: Path, upscale: int = 3) -> None:
    """A PNG of first visit (top) and return (bottom) frames, to look at."""
    from workers.preview import encode_png

    cols = [torch.cat([r["latents"][t0], r["latents"][t]], dim=1) for t0, t in pairs]  # (C, 2H, W) each
    img = torch.cat(cols, dim=2)  # (C, 2H, n*W)
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    img = img.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1).contiguous()
    path.write_bytes(encode_png(img.numpy()))


def run_quality(args) -> dict:
    worlds = [HELD_OUT_WORLDS + i for i in range(args.worlds)]
    modes = ["baseline", "window", "mla window", "retrieval", "sparse"]
    results, fps, hists = {}, {m: [] for m in modes}, []
    for mode in modes:
        per_world = []
        for w in worlds:
            r = rollout(mode, w, args.frames, args.weights)
            fps[mode].append(r["fps"])
            if mode == "mla window":
                hists.append(colour_hist(r["latents"]))
            if mode != "baseline":
                per_world.append(consistency(r))
            if mode in ("mla window", "retrieval") and w == worlds[0]:
                far = [p for p in returns(r["poses"]) if p[1] - p[0] > 96]
                if far:
                    save_strip(
                        r,
                        far[:: max(1, len(far) // 10)][:10],
                        Path(args.out) / f"revisits-{mode.replace(' ', '-')}.png",
                    )
        if per_world:
            results[mode] = average(per_world)
    spread = [tv(hists[i], hists[j]) for i in range(len(hists)) for j in range(i + 1, len(hists))]
    return {"results": results, "fps": {m: sum(v) / len(v) for m, v in fps.items()}, "world_spread_tv": spread}


def average(rows: list[dict]) -> dict:
    def mean(v: list[float]) -> float:  # skips NaN (a world without returns in a bin); NaN when none
        v = [x for x in v if x == x]
        return sum(v) / len(v) if v else float("nan")

    out = {k: mean([r[k] for r in rows]) for k in ("psnr", "ssim", "fidelity_psnr", "psnr_vs_truth_all")}
    out["pairs"] = sum(r["pairs"] for r in rows)
    out["fidelity_frames"] = sum(r["fidelity_frames"] for r in rows)
    out["bins"] = {
        k: {
            "n": sum(r["bins"][k]["n"] for r in rows),
            "psnr": mean([r["bins"][k]["psnr"] for r in rows]),
            "ssim": mean([r["bins"][k]["ssim"] for r in rows]),
        }
        for k in rows[0]["bins"]
    }
    return out


def run_drift(args) -> dict:
    """One long rollout; colour histograms of its first and last 1k frames, and per-world spread."""
    first_world = HELD_OUT_WORLDS
    n = args.drift_frames
    cfg, form = mode_config(args.drift_mode)
    r = rollout(args.drift_mode, first_world, n, args.weights)
    head, tail = colour_hist(r["latents"][:1000]), colour_hist(r["latents"][-1000:])
    early = [
        colour_hist(rollout(args.drift_mode, HELD_OUT_WORLDS + i, 1000, args.weights, False)["latents"])
        for i in range(1, args.worlds + 1)
    ]
    early.insert(0, head)
    spread = [tv(early[i], early[j]) for i in range(len(early)) for j in range(i + 1, len(early))]
    truth_tail = colour_hist(r["truth"][-1000:])
    return {
        "mode": args.drift_mode,
        "frames": n,
        "fps": r["fps"],
        "drift_tv": tv(head, tail),
        "world_spread_tv": spread,
        "tail_vs_truth_tv": tv(tail, truth_tail),
        "head_vs_truth_tv": tv(head, colour_hist(r["truth"][:1000])),
        "tail_psnr_vs_truth": sum(psnr(a, b) for a, b in zip(r["latents"][-1000:], r["truth"][-1000:])) / 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, default=3, help="held-out worlds")
    p.add_argument("--frames", type=int, default=960, help="frames per consistency rollout")
    p.add_argument("--drift-frames", type=int, default=None, help="run the drift rollout of this many frames")
    p.add_argument("--drift-mode", default="retrieval", help="mode of the drift rollout")
    p.add_argument("--weights", default="shipped", help="shipped or a safetensors file")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/bench/quality")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configure_logging("console", "warning")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)"
    print(f"machine: {machine}; date {time.strftime('%Y-%m-%d')}")
    if args.drift_frames:
        d = run_drift(args)
        d["machine"] = machine
        (out / f"drift-{args.drift_mode.replace(' ', '-')}.json").write_text(json.dumps(d, indent=1))
        spread = d["world_spread_tv"]
        table(
            f"drift over {d['frames']} frames ({d['mode']}), colour-histogram total variation",
            ["first 1k vs last 1k", "between worlds (min / mean / max)", "within spread", "frames/s"],
            [[f"{d['drift_tv']:.4f}", f"{min(spread):.4f} / {sum(spread) / len(spread):.4f} / {max(spread):.4f}",
              "yes" if d["drift_tv"] <= max(spread) else "NO", f"{d['fps']:.1f}"]],
        )  # fmt: skip
        tail, head = d["tail_vs_truth_tv"], d["head_vs_truth_tv"]
        print(f"last 1k frames vs the true views there: TV {tail:.4f} (first 1k: {head:.4f})")
        return
    q = run_quality(args)
    q["machine"] = machine
    q["args"] = vars(args)
    (out / "quality.json").write_text(json.dumps(q, indent=1))
    res, fps = q["results"], q["fps"]
    keys = list(next(iter(res.values()))["bins"])
    table(
        "revisit consistency: PSNR dB / SSIM between the return and the first visit, by frames since the first visit",
        ["mode", "all returns", *keys],
        [[m, f"{r['psnr']:.2f} / {r['ssim']:.3f}", *(cell(r["bins"][k]) for k in keys)] for m, r in res.items()],
    )  # fmt: skip
    base = res["mla window"]
    rows = [
        [m, f"{r['psnr'] - base['psnr']:+.2f} dB", f"{r['fidelity_psnr']:.2f} dB", f"{r['psnr_vs_truth_all']:.2f} dB"]
        + [r["pairs"]]
        for m, r in res.items()
    ]
    header = ["mode", "PSNR gain vs window (returns > 15 frames)", "fidelity PSNR at prompt poses"]
    table("retrieval gain and fidelity", header + ["PSNR vs truth, all frames", "returns"], rows)
    table(
        "throughput (same frames, one stream)",
        ["mode", "frames/s", "vs memory-free baseline"],
        [[m, f"{v:.1f}", f"{v / fps['baseline']:.3f}"] for m, v in fps.items()],
    )
    plot_consistency(res, out / "revisit_consistency.png")
    print(f"\nplots and JSON in {out}")


if __name__ == "__main__":
    main()
