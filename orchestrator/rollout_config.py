"""`--config FILE`: rollout settings from a YAML or TOML file, in longroll's names or those of the
Self-Forcing / CausVid / LongLive inference YAMLs (``denoising_step_list``, ``timestep_shift``,
``warp_denoising_step``, ``num_frame_per_block``, ``sink_size``, ``local_attn_size``, also nested
under ``model_kwargs``). Keys about anything else (training, data, logging) are reported and ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from orchestrator.cli_common import UsageError

# longroll ModelConfig fields a config file may set: the rollout, never the shapes (those come from the weights)
ROLLOUT_FIELDS = (
    "sink_frames", "window_frames", "frames_per_chunk", "memory_frames", "memory_exclude_recent", "denoising_steps",
    "shift", "sigmas", "sampler", "position", "max_temporal_id", "memory", "cache_dtype", "dtype", "text_len",
)  # fmt: skip
# names used by the public repositories' YAML files -> longroll's
ALIASES = {
    "denoising_step_list": "denoising_steps",
    "timestep_shift": "shift",
    "num_frame_per_block": "frames_per_chunk",
    "sink_size": "sink_frames",
}
SPECIAL = ("warp_denoising_step", "local_attn_size")  # resolved below


def _read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {path}")
    text = p.read_text(errors="replace")
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml  # PyYAML (a dependency of ray); YAML also reads JSON

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is bad input
        raise UsageError(f"config file {path} does not parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return data


def rollout_overrides(path: str, frames_per_chunk: int, sink_frames: int) -> tuple[dict, list[str]]:
    """ModelConfig overrides from a config file, and the keys it ignored.

    ``local_attn_size`` (LongLive: frames one query attends to, the sink and its own chunk included)
    becomes ``window_frames = local_attn_size - sink - frames_per_chunk``; ``-1`` keeps the preset's.
    ``warp_denoising_step: false`` means no shift.
    """
    data = _read(path)
    flat = dict(data)
    nested = flat.pop("model_kwargs", None)
    if isinstance(nested, dict):
        flat = {**nested, **flat}
    out, ignored = {}, []
    for key, value in flat.items():
        name = ALIASES.get(key, key)
        if name in ROLLOUT_FIELDS:
            out[name] = tuple(value) if isinstance(value, list) else value
        elif key not in SPECIAL:
            ignored.append(key)
    if flat.get("warp_denoising_step") is False:
        out["shift"] = 1.0
    local = flat.get("local_attn_size")
    if local is not None and local != -1:
        fpc = out.get("frames_per_chunk", frames_per_chunk)
        sink = out.get("sink_frames", sink_frames)
        if not isinstance(local, int) or local - sink - fpc < fpc:
            raise UsageError(f"local_attn_size {local!r} must cover the sink ({sink}) and two chunks of {fpc} frames")
        out["window_frames"] = local - sink - fpc
    return out, sorted(ignored)
