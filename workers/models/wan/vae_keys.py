"""Wan2.1 VAE tensor names: the original ``Wan2.1_VAE.pth``'s (``wan/modules/vae.py``) and ``AutoencoderKLWan``'s.

The renames are those of diffusers' ``convert_vae`` (``scripts/convert_wan_to_diffusers.py`` in the
diffusers repository), written out here because that script is not part of the pip package. It
hard-codes the real model's block indices; this map derives them from the config, so it also covers
tiny test VAEs (whose first up-block resnets of every stage have a shortcut, not only stage 1's).

    original                                      diffusers
    conv1 / conv2                                 quant_conv / post_quant_conv
    {encoder,decoder}.conv1                       {encoder,decoder}.conv_in
    {encoder,decoder}.head.0 / head.2             norm_out / conv_out
    {encoder,decoder}.middle.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
    encoder.downsamples.N                         encoder.down_blocks.N (the same flat list)
    decoder.upsamples.N (flat)                    decoder.up_blocks.S.resnets.J / up_blocks.S.upsamplers.0
    in a residual block: residual.0 / 2 / 3 / 6   norm1 / conv1 / norm2 / conv2; shortcut -> conv_shortcut
"""

from __future__ import annotations

import re

SHOW = 3  # names quoted in an error message

_RESNET = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
           ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))  # fmt: skip
_PART = {"norm_out.": "head.0.", "conv_out.": "head.2.", "conv_in.": "conv1.", "mid_block.resnets.0.": "middle.0.",
         "mid_block.attentions.0.": "middle.1.", "mid_block.resnets.1.": "middle.2."}  # fmt: skip


def _resnet_tail(tail: str) -> str:
    for new, old in _RESNET:
        if tail.startswith(new):
            return old + tail[len(new) :]
    return tail


def _decoder_flat_index(config: dict) -> dict[str, int]:
    """``up_blocks.S.resnets.J`` / ``up_blocks.S.upsamplers.0`` -> index in the original flat ``upsamples``."""
    flat, n, stages = {}, 0, len(config["dim_mult"])
    for s in range(stages):
        for j in range(config["num_res_blocks"] + 1):
            flat[f"up_blocks.{s}.resnets.{j}"], n = n, n + 1
        if s != stages - 1:
            flat[f"up_blocks.{s}.upsamplers.0"], n = n, n + 1
    return flat


def diffusers_key_to_original(key: str, config: dict) -> str:
    """One ``AutoencoderKLWan`` state-dict name -> the original Wan2.1 VAE's name."""
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv.") :]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv.") :]
    side, rest = key.split(".", 1)
    for new, old in _PART.items():
        if rest.startswith(new):
            tail = rest[len(new) :]
            return f"{side}.{old}{_resnet_tail(tail) if 'resnets' in new else tail}"
    m = re.match(r"down_blocks\.(\d+)\.(.*)", rest) if side == "encoder" else None
    if m:
        return f"encoder.downsamples.{m[1]}.{_resnet_tail(m[2])}"
    m = re.match(r"(up_blocks\.\d+\.(?:resnets\.\d+|upsamplers\.0))\.(.*)", rest) if side == "decoder" else None
    if m and m[1] in (flat := _decoder_flat_index(config)):
        return f"decoder.upsamples.{flat[m[1]]}.{_resnet_tail(m[2]) if 'resnets' in m[1] else m[2]}"
    raise ValueError(f"no original Wan2.1 VAE name for {key}")


def key_map(diffusers_keys, config: dict) -> dict[str, str]:
    """{original name: diffusers name} for every diffusers name given (the loader's direction)."""
    out = {diffusers_key_to_original(k, config): k for k in diffusers_keys}
    if len(out) != len(diffusers_keys):  # a bug in the table, not in a checkpoint
        raise AssertionError("the Wan VAE key map is not one-to-one")
    return out


def infer_original_config(sd: dict) -> dict:
    """The architecture of an original-layout state dict, from its tensor names and shapes.

    Returns {z_dim, base_dim, dim_mult, num_res_blocks, temperal_downsample} (attention-free stages,
    as every Wan2.1 VAE). Raises ValueError naming the first tensor that is missing or unexpected.
    """
    for need in ("conv2.weight", "encoder.conv1.weight"):
        if need not in sd:
            raise ValueError(f"not an original Wan2.1 VAE state dict: no {need} ({_names(sd)})")
    z_dim, base = int(sd["conv2.weight"].shape[0]), int(sd["encoder.conv1.weight"].shape[0])
    entries: dict[int, set[str]] = {}
    for k in sd:
        m = re.match(r"encoder\.downsamples\.(\d+)\.(.*)", k)
        if m:
            entries.setdefault(int(m[1]), set()).add(m[2])
    resample = sorted(i for i, names in entries.items() if "resample.1.weight" in names)
    if not entries or any(".to_qkv." in n or n.startswith("to_qkv") for v in entries.values() for n in v):
        raise ValueError("original VAE without encoder.downsamples, or with attention in them: not a Wan2.1 VAE")
    stages = len(resample) + 1
    res_blocks, extra = divmod(len(entries) - len(resample), stages)
    if extra or res_blocks < 1:
        raise ValueError(f"{len(entries)} encoder.downsamples entries do not split into {stages} equal stages")
    dim_mult, temporal, n = [], [], 0
    for s in range(stages):
        last = n + res_blocks - 1
        w = sd.get(f"encoder.downsamples.{last}.residual.6.weight")
        if w is None:
            raise ValueError(f"original VAE without encoder.downsamples.{last}.residual.6.weight")
        dim_mult.append(int(w.shape[0]) // base)
        n += res_blocks
        if s != stages - 1:
            temporal.append(f"encoder.downsamples.{n}.time_conv.weight" in sd)
            n += 1
    return dict(z_dim=z_dim, base_dim=base, dim_mult=dim_mult, num_res_blocks=res_blocks,
                temperal_downsample=temporal)  # fmt: skip


def _names(sd: dict) -> str:
    keys = sorted(sd)
    return ", ".join(keys[:SHOW]) + (f", ... ({len(keys)} tensors)" if len(keys) > SHOW else "")
