"""Wan2.1 tensor names: the original repository's and diffusers' ``WanTransformer3DModel``'s, both ways.

The forward rename is diffusers' own ``convert_wan_transformer_to_diffusers``
(``diffusers/loaders/single_file_utils.py``): the same ordered substring replacements, T2V and
I2V entries (VACE / Animate models are not Wan2.1 T2V and are left out). Training wrappers are
stripped first: FSDP's ``_fsdp_wrapped_module.``, activation checkpointing's, ``torch.compile``'s
``_orig_mod.``, and the ``model.`` / ``module.`` / ``base_model.model.`` (peft) prefixes.

:func:`check_keys` compares a state dict with a ``WanTransformer3DModel`` built on the meta device.
"""

from __future__ import annotations

import functools
import inspect
import json
import re

import torch

SHOW = 4  # names quoted in an error message


class WeightsError(ValueError):
    """Weights that cannot be used, with a one-line message saying why."""


# (original substring, diffusers substring), applied in this order to every key (diffusers' table)
RENAMES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"),
    ("self_attn", "attn1"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    (".k_img.", ".add_k_proj."),
    (".v_img.", ".add_v_proj."),
    (".norm_k_img.", ".norm_added_k."),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    # original norm3 (the affine cross-attention norm) is diffusers' norm2, and the other way round
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
)
HEAD_RENAMES = RENAMES[14:16]  # the top-level head, inverted by hand (its diffusers names are not unique substrings)

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
PREFIXES = ("base_model.model.", "model.diffusion_model.", "model.", "module.")

# names (parameter or module) that only one of the two layouts has
_ORIGINAL = re.compile(
    r"(^|\.)(self_attn|cross_attn|time_embedding|text_embedding|time_projection|img_emb)(\.|$)"
    r"|^head\.|(^|\.)modulation$|(^|\.)ffn\.[02](\.|$)"
)
_DIFFUSERS = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|ffn\.net)(\.|$)|(^|\.)scale_shift_table$")


def strip_wrappers(key: str) -> str:
    """``model._fsdp_wrapped_module.blocks.0...`` -> ``blocks.0...``: training-time wrappers removed."""
    for seg in WRAPPER_SEGMENTS:
        key = key.replace(seg, "")
    stripped = True
    while stripped:
        stripped = False
        for p in PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p) :], True
    return key


def key_layout(keys) -> str:
    """Which names ``keys`` use: "original", "diffusers", "mixed" (both kinds of names) or "unknown" (neither)."""
    orig = any(_ORIGINAL.search(k) for k in keys)
    diff = any(_DIFFUSERS.search(k) for k in keys)
    return {(True, False): "original", (False, True): "diffusers", (True, True): "mixed"}.get((orig, diff), "unknown")


def original_key_to_diffusers(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def diffusers_key_to_original(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key[len("proj_out.") :]
    for old, new in reversed(RENAMES):
        if (old, new) not in HEAD_RENAMES:
            key = key.replace(new, old)
    return key


def original_to_diffusers(sd: dict) -> dict:
    """A state dict in original Wan names -> diffusers names (values untouched)."""
    return {original_key_to_diffusers(k): v for k, v in sd.items()}


def diffusers_to_original(sd: dict) -> dict:
    """The inverse of :func:`original_to_diffusers` (diffusers names -> original Wan names)."""
    return {diffusers_key_to_original(k): v for k, v in sd.items()}


def original_config_to_diffusers(c: dict) -> dict:
    """The original Wan ``config.json`` (dim, num_heads, in_dim, ...) -> a diffusers WanTransformer3DModel config.

    Raises:
        ValueError: a required field is missing or ``dim`` is not a multiple of ``num_heads``.
    """
    missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in c]
    if missing:
        raise ValueError(f"original Wan config lacks {', '.join(missing)}")
    dim, heads = int(c["dim"]), int(c["num_heads"])
    if heads <= 0 or dim % heads:
        raise ValueError(f"original Wan config: dim {dim} is not a multiple of num_heads {heads}")
    out = dict(
        patch_size=tuple(c.get("patch_size", (1, 2, 2))),
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=int(c.get("in_dim", 16)),
        out_channels=int(c.get("out_dim", 16)),
        text_dim=int(c.get("text_dim", 4096)),  # umT5-XXL's width; Wan's config.json does not record it
        freq_dim=int(c.get("freq_dim", 256)),
        ffn_dim=int(c["ffn_dim"]),
        num_layers=int(c["num_layers"]),
        cross_attn_norm=bool(c.get("cross_attn_norm", True)),
        qk_norm="rms_norm_across_heads" if c.get("qk_norm", True) else None,
        eps=float(c.get("eps", 1e-6)),
    )
    if c.get("model_type") in ("i2v", "flf2v"):  # as diffusers' I2V configs: CLIP image tokens, extra K/V
        out.update(image_dim=1280, added_kv_proj_dim=dim)
    return out


# ---- checking against a config -------------------------------------------------------------------
def check_keys(sd: dict[str, torch.Tensor], config) -> None:
    """Key set and shapes of ``sd`` equal those of ``WanTransformer3DModel(**config)``.

    ``config``: a diffusers config dict (extra keys such as ``_class_name`` ignored); None: the
    shapes ``sd`` itself implies (:func:`infer_config`), so only its structure is checked.
    Raises:
        WeightsError: missing / unexpected tensors (counts and the first names) or mismatched shapes.
    """
    want = expected_shapes(config if config is not None else infer_config(sd))
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    if missing or unexpected:
        parts = [f"{len(missing)} missing and {len(unexpected)} unexpected tensors for this Wan config"]
        if missing:
            parts.append(f"missing: {', '.join(missing[:SHOW])}{' ...' if len(missing) > SHOW else ''}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:SHOW])}{' ...' if len(unexpected) > SHOW else ''}")
        raise WeightsError("; ".join(parts))
    bad = [k for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        k = bad[0]
        raise WeightsError(
            f"{len(bad)} tensors have shapes other than the config's, e.g. {k} {tuple(sd[k].shape)} (config: {want[k]})"
        )


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a diffusers WanTransformer3DModel built from ``config`` on the meta device."""
    allowed = set(inspect.signature(_wan_class().__init__).parameters) - {"self"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(config).items() if k in allowed}
    return dict(_expected_shapes(json.dumps(kwargs, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _expected_shapes(kwargs_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(kwargs_json).items()}
    try:
        with torch.device("meta"):
            model = _wan_class()(**kwargs)
    except Exception as e:  # noqa: BLE001 - any constructor failure means the config is not a Wan one
        raise WeightsError(f"config does not build a WanTransformer3DModel ({_one_line(e)})") from None
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _wan_class():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """A config with the shapes of a diffusers-named ``sd``, for checking weights no config came with.

    The head count is not recoverable (q/k RMSNorm spans all heads, every projection is dim x dim):
    it is 1 here, which builds the same tensor shapes as the true one.
    Raises:
        WeightsError: ``sd`` lacks the tensors that carry the shapes.
    """
    need = ("patch_embedding.weight", "proj_out.weight", "condition_embedder.time_embedder.linear_1.weight",
            "condition_embedder.text_embedder.linear_1.weight", "blocks.0.ffn.net.0.proj.weight")  # fmt: skip
    lacking = [k for k in need if k not in sd]
    if lacking:
        first = ", ".join(sorted(sd)[:SHOW]) or "none"
        raise WeightsError(f"not Wan transformer weights: no {lacking[0]} ({len(sd)} tensors, e.g. {first})")
    if sd["patch_embedding.weight"].dim() != 5 or sd["proj_out.weight"].dim() != 2:
        raise WeightsError("not Wan transformer weights: patch_embedding.weight is not 5-D or proj_out.weight not 2-D")
    dim, cin, *patch = sd["patch_embedding.weight"].shape
    blocks = {int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}

    def width(key: str, axis: int) -> int | None:
        return sd[key].shape[axis] if key in sd else None

    return dict(
        patch_size=tuple(patch),
        num_attention_heads=1,
        attention_head_dim=dim,
        in_channels=cin,
        out_channels=sd["proj_out.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        freq_dim=sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        ffn_dim=sd["blocks.0.ffn.net.0.proj.weight"].shape[0],
        num_layers=max(blocks) + 1,
        cross_attn_norm="blocks.0.norm2.weight" in sd,
        image_dim=width("condition_embedder.image_embedder.norm1.weight", 0),  # I2V only
        added_kv_proj_dim=width("blocks.0.attn2.add_k_proj.weight", 1),
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
