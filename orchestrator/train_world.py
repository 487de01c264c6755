"""`longroll train-world`: train the tiny world model on procedural worlds (resumable)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from orchestrator import bounds
from orchestrator.cli_common import UsageError, check_flags, check_threads, check_writable_location


def register(sub) -> None:
    p = sub.add_parser(
        "train-world",
        help="chunk-causal flow-matching training of the tiny DiT on procedural worlds (resumable)",
    )
    p.add_argument("--out", required=True, help="run directory (running again with it continues the run)")
    p.add_argument("--recipe", default="cpu", help="training preset: cpu, gpu or smoke (default: cpu)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None, help="contexts per step (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def world_model_config():
    """The architecture that ships: the tiny preset with its latent cache (weights fit every memory mode)."""
    from workers.config import ModelConfig

    return ModelConfig.from_name("tiny", attention="mla", memory="retrieval")


def run(args) -> int:
    import torch

    from workers.world.train import META, WEIGHTS, TrainConfig, train_world

    check_flags(args, bounds.TRAIN_WORLD_FLAGS)
    check_threads(args)
    check_writable_location("--out", args.out)
    try:
        tc = TrainConfig.from_name(args.recipe, steps=args.steps, batch=args.batch, lr=args.lr, threads=args.threads)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {device!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out is not a directory: {out}")
    cfg = world_model_config()
    if (out / META).exists():  # train_world itself refuses a run of another model config
        done = json.loads((out / META).read_text())
        if done.get("step", 0) > tc.steps:
            raise UsageError(f"{out} is already past step {tc.steps} (at {done['step']}); ask for more steps")
    bar = tqdm(total=tc.steps, disable=args.quiet, desc="train-world", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        meta = train_world(out, cfg, tc, device=device, progress=progress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    plot = loss_plot(meta["losses"], out / "loss.png", title=f"train-world ({meta['device']})")
    summary = {
        "out": str(out),
        "weights": str(out / WEIGHTS),
        "weights_bytes": os.path.getsize(out / WEIGHTS),
        "steps": meta["step"],
        "batch": tc.batch,
        "wall_s": round(meta["wall_s"], 1),
        "device": meta["device"],
        "first_loss": meta["losses"][0],
        "final_loss_avg50": round(sum(meta["losses"][-50:]) / len(meta["losses"][-50:]), 5),
        "loss_plot": str(plot),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s on {summary['device']}: loss "
            f"{summary['first_loss']:.4f} -> {summary['final_loss_avg50']:.4f} (mean of the last 50); "
            f"weights {summary['weights']} ({summary['weights_bytes'] / 1e6:.1f} MB), curve {plot}"
        )
    return 0


def loss_plot(losses: list[float], path: Path, title: str) -> Path:
    """Training loss per step and its running mean, as a PNG (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, min(50, len(losses) // 10))
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.5, alpha=0.35, label="loss per step")
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE of velocity)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
