"""Chunk-causal flow-matching training of the tiny DiT on procedural worlds (``longroll train-world``).

Each step draws a batch of inference-shaped contexts (``world_data``), noises the target chunk at a
noise level of the sampler's schedule (or a uniform one), and regresses the flow-matching velocity
``eps - x0`` of the target frames with the masked training forward (``world_forward``).

Resumable: every ``save_every`` steps the run directory gets ``train_state.safetensors`` (weights and
AdamW moments) and ``train_state.json`` (step, losses, wall time, config), both written to a temporary
name and renamed. Running the same command again continues from there; batches are a pure function of
(data seed, step), so a resumed run trains on exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import structlog
import torch
from safetensors.torch import load_file, save_file

from ops.rope import Rope3D
from workers.config import ModelConfig
from workers.models.tiny import cond_vector
from workers.models.tiny.model import CausalVideoDiT
from workers.world.data import ContextSampler
from workers.world.forward import train_forward

log = structlog.get_logger(__name__)
STATE = "train_state.safetensors"
META = "train_state.json"
WEIGHTS = "weights.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps in all (a resumed run stops at the same total)
    batch: int = 8  # contexts per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warmup, cosine decay to 10%)
    warmup: int = 100  # warmup steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    schedule_share: float = 0.75  # share of target noise levels drawn from the sampler's own sigmas
    retrieval_share: float = 0.6  # share of retrieval-shaped contexts (the rest: window only)
    data_seed: int = 0  # batches are a function of (data_seed, step)
    save_every: int = 50  # steps between resumable states
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.save_every < 1 or not self.lr > 0:
            raise ValueError(f"steps, batch, save_every must be >= 1 and lr > 0: {self}")
        if not 0 <= self.schedule_share <= 1 or not 0 <= self.retrieval_share <= 1:
            raise ValueError("schedule_share and retrieval_share must be in [0, 1]")

    @classmethod
    def from_name(cls, name: str, **overrides) -> TrainConfig:
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return replace(TRAIN_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


TRAIN_PRESETS = {
    "cpu": TrainConfig(),  # about an hour on 2 CPU cores
    "gpu": TrainConfig(steps=20000, batch=64, lr=1e-3, warmup=500, save_every=500),
    "smoke": TrainConfig(steps=4, batch=2, warmup=1, save_every=2),  # tests
}


def lr_at(tc: TrainConfig, step: int) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _noise_levels(tc: TrainConfig, cfg: ModelConfig, gen: torch.Generator, b: int) -> torch.Tensor:
    sched = torch.tensor(cfg.sigmas)[torch.randint(len(cfg.sigmas), (b,), generator=gen)]
    uniform = 0.02 + 0.98 * torch.rand(b, generator=gen)
    return torch.where(torch.rand(b, generator=gen) < tc.schedule_share, sched, uniform)


def _save_state(run_dir: Path, model, opt, meta: dict) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"adam.exp_avg.{names[id(p)]}"] = st["exp_avg"].contiguous()
                tensors[f"adam.exp_avg_sq.{names[id(p)]}"] = st["exp_avg_sq"].contiguous()
                meta.setdefault("adam_step", float(st["step"]))
    tmp = run_dir / f".{STATE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, run_dir / STATE)
    tmp = run_dir / f".{META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, run_dir / META)  # the commit record: written last


def _load_state(run_dir: Path, model, opt) -> dict:
    meta = json.loads((run_dir / META).read_text())
    tensors = load_file(str(run_dir / STATE))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    for n, p in model.named_parameters():
        if f"adam.exp_avg.{n}" in tensors:
            opt.state[p] = {
                "step": torch.tensor(meta.get("adam_step", meta["step"])),
                "exp_avg": tensors[f"adam.exp_avg.{n}"],
                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"],
            }
    return meta


def train_world(
    run_dir: str | Path,
    cfg: ModelConfig,
    tc: TrainConfig,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train (or continue training) in ``run_dir``; returns the final meta (also in ``train_state.json``).

    ``run_dir/weights.safetensors`` holds the model weights after the last step.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = CausalVideoDiT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))
    model_dict = json.loads(json.dumps(cfg.to_dict()))  # as JSON gives it back (tuples -> lists)
    meta = {"step": 0, "losses": [], "wall_s": 0.0, "model": model_dict, "train": asdict(tc)}
    if (run_dir / META).exists():
        old = json.loads((run_dir / META).read_text())
        if old.get("model") != model_dict:
            raise ValueError(f"{run_dir} holds a run of another model config; use a new directory")
        meta = _load_state(run_dir, model, opt)
        meta["train"] = asdict(tc)
        log.info("train.resume", step=meta["step"])
    meta["device"] = _device_name(device)
    sampler = ContextSampler(cfg, seed=tc.data_seed, retrieval_share=tc.retrieval_share)
    rope = Rope3D(cfg.rope_width, cfg.rope_theta)
    model.train()
    t_last = time.perf_counter()
    while meta["step"] < tc.steps:
        step = meta["step"]
        batch = sampler.batch(step, tc.batch)
        gen = torch.Generator().manual_seed(1_000_003 * tc.data_seed + step)
        b = tc.batch
        x0 = batch.latents.to(device)
        tgt = batch.target.to(device)
        sig = _noise_levels(tc, cfg, gen, b).to(device)
        eps = torch.randn(x0[:, tgt].shape, generator=gen).to(device)
        x = x0.clone()
        x[:, tgt] = (1 - sig)[:, None, None, None, None] * x0[:, tgt] + sig[:, None, None, None, None] * eps
        sigma = torch.zeros(b, x0.shape[1], device=device)
        sigma[:, tgt] = sig[:, None]
        cond = torch.randn(b, cfg.cond_dim, generator=gen).to(device)  # prompts are not part of the world
        cond[0] = cond_vector("", cfg.cond_dim)  # the default prompt is always in the batch
        for g in opt.param_groups:
            g["lr"] = lr_at(tc, step)
        v = train_forward(
            model, rope, x, sigma, cond, batch.actions.to(device), batch.temporal_ids.to(device),
            batch.poses.to(device), batch.frame_vis.to(device), tgt,
        )  # fmt: skip
        loss = torch.nn.functional.mse_loss(v.float(), (eps - x0[:, tgt]).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        now = time.perf_counter()
        meta["wall_s"] += now - t_last
        t_last = now
        loss_value = float(loss.detach())
        meta["losses"].append(round(loss_value, 6))
        meta["step"] = step + 1
        if progress is not None:
            progress(meta["step"], tc.steps, loss_value)
        if meta["step"] % tc.save_every == 0 or meta["step"] == tc.steps:
            meta.pop("adam_step", None)
            _save_state(run_dir, model, opt, meta)
    model.eval()
    tmp = run_dir / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, run_dir / WEIGHTS)
    return meta


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
