"""Deployment sizing: cache bytes per token and per stream, streams per GPU, store growth."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

import torch

from ops.latent_cache import TORCH_DTYPES
from orchestrator import bounds
from orchestrator.budget_options import add_budget_options, budget_overrides, check_budget
from orchestrator.cli_common import UsageError, add_model_options, build_config
from workers.config import ModelConfig
from workers.models.tiny.model import CausalVideoDiT

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
RESERVED_FRACTION = 0.10  # of GPU memory kept free for the allocator, CUDA context and fragmentation


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '141GiB' -> 141 * 2**30. Raises UsageError (a ValueError) on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"cannot read a memory size from {text!r} (try 80GB or 141GiB)")
    size = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not 1 <= size <= bounds.MAX_GPU_MEM:  # also inf: '9' * 400 digits
        raise UsageError(f"--gpu-mem {text[:40]!r} must be 1 B..16 TiB (one accelerator's memory)")
    return int(size)


UMT5_XXL_PARAMS = 5_680_910_336  # the umT5-XXL encoder's parameters (workers.models.wan.text.umt5_xxl_config)


def vae_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """(Wan2.1 VAE weights bytes, one stream's decoder feature cache bytes at cfg's pixel size), in cfg's dtype.

    Both from the meta device: nothing is allocated (workers.models.wan.vae.decoder_cache_bytes).
    """
    from workers.models.wan.vae import _meta_vae, decoder_cache_bytes, wan21_vae_config

    dtype = TORCH_DTYPES[cfg.dtype]
    params = sum(p.numel() for p in _meta_vae(wan21_vae_config()).parameters())
    h, w = cfg.latent_height * cfg.vae_stride[1], cfg.latent_width * cfg.vae_stride[2]
    return params * dtype.itemsize, decoder_cache_bytes(wan21_vae_config(), h, w, dtype)


def count_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        if cfg.family == "wan":
            from workers.models.wan.model import WanChunkModel

            model = WanChunkModel(cfg)
        else:
            model = CausalVideoDiT(cfg)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class StreamBudget:
    """Bytes one stream holds while it runs (what limits how many fit in a memory)."""

    cache: int  # its cache at capacity, the text K/V included
    text_kv: int  # wan: the prompt's cross-attention K/V (part of ``cache``)
    activations: int  # live activations of one chunk, one layer at a time

    @property
    def total(self) -> int:
        return self.cache + self.activations


def stream_budget(cfg: ModelConfig) -> StreamBudget:
    elem = TORCH_DTYPES[cfg.dtype].itemsize
    chunk_tokens = cfg.frames_per_chunk * cfg.tokens_per_frame
    # live activations of one stream's chunk: residual + FFN hidden + q/k/v/out, one layer at a time
    activations = chunk_tokens * cfg.dim * (cfg.ffn_hidden // cfg.dim + 6) * elem
    # wan: the prompt's cross-attention K/V, computed once per stream and kept ([k | v] x layers x text tokens)
    text_kv = 2 * cfg.num_layers * cfg.text_len * cfg.dim * elem if cfg.family == "wan" else 0
    return StreamBudget(cfg.cache_layout().capacity_bytes() + text_kv, text_kv, activations)


def plan(cfg: ModelConfig, gpu_mem: int, hours: float, store_overrides: dict | None = None) -> dict:
    """Size a deployment of ``cfg`` on GPUs with ``gpu_mem`` bytes for streams of ``hours`` hours.

    ``store_overrides``: MemoryStoreConfig overrides (the --hot-tier-rows / --payload-cache / --encoded-row-cache
    flags); the memory-system figures are those of ``--memory retrieval`` streams.

    Returns a JSON-able dict; every byte figure is in bytes.
    """
    problem = bounds.PLAN_FLAGS["hours"].problem(hours)
    if problem:
        raise UsageError(f"--hours {problem}")
    layout = cfg.cache_layout()
    base_dtype = "bf16" if cfg.cache_dtype == "fp8" else cfg.cache_dtype
    mha = replace(cfg, attention="mha", cache_dtype=base_dtype).cache_layout()
    elem = TORCH_DTYPES[cfg.dtype].itemsize
    params = count_params(cfg)
    weights = params * elem
    budget = stream_budget(cfg)
    activations, text_kv, cache_stream = budget.activations, budget.text_kv, budget.cache
    # wan: the umT5-XXL encoder sits beside the model once a worker encodes a prompt (--prompt-embeds avoids it)
    text_encoder = UMT5_XXL_PARAMS * elem if cfg.family == "wan" else 0
    usable = gpu_mem * (1 - RESERVED_FRACTION) - weights - text_encoder
    streams = max(0, math.floor(usable / (cache_stream + activations)))
    # wan with --vae: the VAE beside the model, and each stream's decoder cache (rebuilt, never checkpointed)
    vae_weights, vae_cache = vae_sizes(cfg) if cfg.family == "wan" else (0, 0)
    video_streams = max(0, math.floor((usable - vae_weights) / (cache_stream + activations + vae_cache)))
    video_fps = cfg.fps  # real time
    latent_fps = video_fps / cfg.vae_stride[0]
    chunks_per_hour = latent_fps * 3600 / cfg.frames_per_chunk
    row_bytes = (
        cfg.frames_per_chunk * cfg.latent_channels * cfg.latent_height * cfg.latent_width * 2 + cfg.embedding_dim * 4
    )
    store_hour = chunks_per_hour * row_bytes
    from workers.memory import MemoryLink
    from workers.memory_budget import disk_overhead, memory_budget

    store = MemoryLink.store_config("memory", cfg, **(store_overrides or {}))
    mem = memory_budget(replace(cfg, memory="retrieval"), store)
    retrieval_streams = max(0, math.floor(usable / (cache_stream + activations + mem.encoded_rows)))
    overhead, pileup = disk_overhead(store, row_bytes)
    return {
        "preset": cfg.name,
        "attention": cfg.attention,
        "cache_dtype": cfg.cache_dtype,
        "family": cfg.family,
        "layers": cfg.num_layers,
        "dim": cfg.dim,
        "heads": cfg.num_heads,
        "ffn_dim": cfg.ffn_hidden,
        "tokens_per_frame": cfg.tokens_per_frame,
        "context_frames": layout.slot_frames,
        "cache_bytes_per_token": layout.bytes_per_token(),
        "cache_bytes_per_token_per_layer": layout.bytes_per_token_per_layer(),
        "mha_cache_bytes_per_token": mha.bytes_per_token(),
        "cache_reduction_pct": 100.0 * (1 - layout.bytes_per_token() / mha.bytes_per_token()),
        "cache_bytes_per_frame": layout.bytes_per_token() * cfg.tokens_per_frame,
        "cache_bytes_per_stream": cache_stream,
        "mha_cache_bytes_per_stream": mha.capacity_bytes() + text_kv,
        "text_kv_bytes_per_stream": text_kv,
        "text_encoder_bytes": text_encoder,
        "params": params,
        "weights_bytes": weights,
        "activation_bytes_per_stream": activations,
        "gpu_mem_bytes": gpu_mem,
        "streams_per_gpu": streams,
        "vae_weights_bytes": vae_weights,
        "decoder_cache_bytes_per_stream": vae_cache,
        "video_streams_per_gpu": video_streams if cfg.family == "wan" else streams,
        "mha_streams_per_gpu": max(0, math.floor(usable / (mha.capacity_bytes() + text_kv + activations))),
        "store_bytes_per_stream_hour": store_hour,
        "store_disk_bytes_per_stream_hour": store_hour * overhead,
        "store_disk_overhead": overhead,
        "store_disk_pileup_bytes_per_stream": pileup,
        "memory_budget": mem.to_dict(),
        "hot_tier_rows": store.hot_tier_rows,
        "retrieval_streams_per_gpu": retrieval_streams,
        "hours": hours,
        "store_bytes_per_stream": store_hour * hours,
        "store_disk_bytes_per_stream": store_hour * hours * overhead + pileup,
        "frames_per_stream": int(video_fps * 3600 * hours),
    }


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def _budget_rows(p: dict) -> list[tuple[str, str]]:
    """The memory system's declared bounds (workers/memory_budget.py), as `plan` prints them."""
    b = p["memory_budget"]
    return [
        (
            "memory budget per stream (--memory retrieval)",
            f"host {human(b['host_per_stream'])}: hot tier {human(b['hot_tier'])} ({p['hot_tier_rows']:,} chunks), "
            f"payload LRU {human(b['payload_cache'])}, prefetch {human(b['prefetch'])}",
        ),
        (
            "  on the GPU, beside the cache",
            f"encoded memory rows {human(b['encoded_rows'])} ({human(b['chunk_rows'])} per chunk); "
            f"streams per GPU with retrieval: {p['retrieval_streams_per_gpu']}",
        ),
        ("  dashboard telemetry per stream", f"at most {human(b['telemetry'])} (orchestrator)"),
        (
            "  per worker",
            f"writer queue {human(b['writer_queue_per_worker'])}, LanceDB caches {human(b['lance_caches_per_worker'])}",
        ),
    ]


def format_plan(p: dict) -> str:
    rows = [
        ("preset / attention / cache dtype", f"{p['preset']} / {p['attention']} / {p['cache_dtype']}"),
        ("model", f"{p['family']}: {p['layers']} layers, dim {p['dim']}, FFN {p['ffn_dim']}, {p['heads']} heads"),
        (
            "cache per token (all layers)",
            f"{human(p['cache_bytes_per_token'])}  vs MHA {human(p['mha_cache_bytes_per_token'])}"
            f"  ({p['cache_reduction_pct']:.1f}% less)",
        ),
        ("cache per latent frame", human(p["cache_bytes_per_frame"])),
        (
            "cache per stream",
            f"{human(p['cache_bytes_per_stream'])} ({p['context_frames']} frames)"
            f"  vs MHA {human(p['mha_cache_bytes_per_stream'])}",
        ),
        ("weights", f"{human(p['weights_bytes'])} ({p['params'] / 1e6:.1f} M params)"),
        *(
            [
                ("text K/V per stream (in cache per stream)", human(p["text_kv_bytes_per_stream"])),
                ("umT5-XXL text encoder", f"{human(p['text_encoder_bytes'])} (counted; --prompt-embeds needs none)"),
            ]
            if p["text_kv_bytes_per_stream"]
            else []
        ),
        (
            "streams per GPU",
            f"{p['streams_per_gpu']}  (MHA: {p['mha_streams_per_gpu']}) on {human(p['gpu_mem_bytes'])}",
        ),
        *(
            [
                (
                    "VAE decode (--vae): per stream",
                    f"{human(p['decoder_cache_bytes_per_stream'])} decoder cache (rebuilt on resume, not saved); "
                    f"VAE {human(p['vae_weights_bytes'])}",
                ),
                ("streams per GPU with video", str(p["video_streams_per_gpu"])),
            ]
            if p["decoder_cache_bytes_per_stream"]
            else []
        ),
        *_budget_rows(p),
        (
            "memory store per stream-hour",
            f"{human(p['store_bytes_per_stream_hour'])} of payload; on disk at most "
            f"{human(p['store_disk_bytes_per_stream_hour'])} "
            f"(x{p['store_disk_overhead']:.2f}, between maintenance passes) "
            f"+ {human(p['store_disk_pileup_bytes_per_stream'])} once per stream",
        ),
        (
            f"memory store per stream, {p['hours']:g} h",
            f"{human(p['store_bytes_per_stream'])} ({p['frames_per_stream']:,} frames); "
            f"on disk at most {human(p['store_disk_bytes_per_stream'])}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def register(sub) -> None:
    p = sub.add_parser("plan", help="size a deployment: cache per token/stream, streams per GPU, store growth")
    add_model_options(p, memory=False)
    add_budget_options(p)
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB or 141GiB")
    p.add_argument("--hours", type=float, default=24.0, help="length of one stream")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build_config(args)
    budget = budget_overrides(args)
    check_budget(replace(cfg, memory="retrieval"), budget)
    result = plan(cfg, parse_bytes(args.gpu_mem), args.hours, budget)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0
