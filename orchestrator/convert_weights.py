"""`longroll convert-weights SRC OUT.safetensors`: any accepted Wan layout, once, to one diffusers-named file.

SRC is anything ``--weights`` takes (diffusers transformer / pipeline folder, original Wan2.1 folder,
Self-Forcing / CausVid / LongLive ``.pt``, a state-dict ``.safetensors``); the LoRA is merged in.
The diffusers config, when known, goes into the file's metadata under "config", so the file alone
is a valid ``--weights`` later. Bad input: one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from orchestrator.cli_common import UsageError


def register(sub) -> None:
    p = sub.add_parser("convert-weights", help="convert Wan-family weights to one diffusers-named .safetensors")
    p.add_argument(
        "src",
        help="a diffusers transformer or pipeline folder, an original Wan2.1 folder, a Self-Forcing / CausVid / "
        "LongLive .pt or a state-dict .safetensors",
    )
    p.add_argument("out", help="output .safetensors (the diffusers config is stored in its metadata as 'config')")
    p.add_argument("--base", default=None, help="folder whose config.json gives a bare .pt / .safetensors its shapes")
    p.add_argument("--lora", default=None, help="LongLive LoRA file, merged into the weights")
    p.add_argument("--no-ema", action="store_true", help="a Self-Forcing .pt's generator, not generator_ema")
    p.set_defaults(func=run)


def run(args) -> int:
    from orchestrator.generate import check_output_path
    from workers.models.wan.weights import WeightsError, check_keys, load_state_dict, resolve_source

    out = check_output_path(args.out, ".safetensors")
    inputs = [p for p in (args.src, args.lora) if p]
    if out.exists() and any(Path(p).exists() and Path(p).resolve() == out.resolve() for p in inputs):
        raise UsageError(f"output {args.out} is one of the inputs")
    try:
        src = resolve_source(args.src, args.base, args.lora)
        sd = load_state_dict(src, ema=not args.no_ema)
        check_keys(sd, src.config)  # None: the shapes the tensors imply
    except WeightsError as e:
        raise UsageError(str(e)) from None
    metadata = {"format": "pt"}
    if src.config is not None:
        metadata["config"] = json.dumps(src.config, sort_keys=True)
    nbytes = save_atomic(out, sd, metadata)
    where = src.config_from if src.config is not None else "none (no --base; pass one to record the shapes' config)"
    lora = f", LoRA {args.lora} merged" if args.lora else ""
    print(f"wrote {out}: {len(sd)} tensors, {nbytes / 1e6:.1f} MB{lora}; config: {where}")
    return 0


def save_atomic(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """safetensors file written beside ``path`` and renamed into place: never half-written. Returns its bytes."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for k, v in sd.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():  # safetensors refuses tensors that share memory
            v = v.clone()
        seen.add(ptr)
        tensors[k] = v
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size
