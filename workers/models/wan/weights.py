"""Wan-family weights in diffusers' ``WanTransformer3DModel`` names, from every layout ``--weights`` accepts.

    --weights                              kind                    transformer tensors        config
    diffusers transformer folder           diffusers-transformer   diffusion_pytorch_model*   its config.json
    diffusers pipeline folder              diffusers-pipeline      transformer/ (as above)    transformer/config.json
    original Wan2.1 folder                 wan-original            diffusion_pytorch_model*   config.json, converted
    Self-Forcing / CausVid / LongLive .pt  pt                      generator(_ema) or flat    --base DIR, else None
    state-dict .safetensors                safetensors             the file                   --base DIR, else the
                                                                                              file's "config" metadata

A Hugging Face cache entry ``.../models--ORG--NAME`` stands for its ``refs/main`` snapshot (else the
newest one). Original names are detected by content and renamed (``keys.py``); a LongLive LoRA is
merged at load, so no peft is needed at run time. ``.pt`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.models.wan.keys import (  # noqa: F401 - check_keys, infer_config, diffusers_to_original re-exported
    SHOW,
    WeightsError,
    _one_line,
    check_keys,
    diffusers_to_original,
    infer_config,
    key_layout,
    original_config_to_diffusers,
    original_key_to_diffusers,
    original_to_diffusers,
    strip_wrappers,
)

PT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
WEIGHTS_NAME = "diffusion_pytorch_model"  # file stem of diffusers' (and original Wan's) transformer weights
FULL_HASH_BYTES = 64 << 20  # files below this are hashed whole; larger ones by name, size, first and last MiB
EDGE_HASH_BYTES = 1 << 20


@dataclass(frozen=True)
class WanSource:
    """Where a Wan model's parts are, resolved from a --weights path (+ optional --base / --lora)."""

    kind: str  # "diffusers-transformer" | "diffusers-pipeline" | "wan-original" | "pt" | "safetensors"
    weights: str  # the path given
    transformer_files: tuple[str, ...]  # files holding transformer tensors (safetensors shards or one .pt)
    config: dict | None  # diffusers WanTransformer3DModel config dict (None when nothing carries one)
    text_encoder_dir: str | None  # HF-format UMT5 encoder folder if present (pipeline folder's text_encoder/)
    tokenizer_dir: str | None  # tokenizer folder if present (pipeline's tokenizer/, original Wan's google/umt5-xxl/)
    vae: str | None  # pipeline's vae/ folder or original folder's Wan2.1_VAE.pth, if present
    original_text_encoder: str | None  # original Wan folder's models_t5_umt5-xxl-enc-bf16.pth, if present
    lora: str | None
    base: str | None
    config_from: str | None = None  # where config came from, for messages ("DIR/config.json", ...)


# ---- resolving a path ----------------------------------------------------------------------------
def resolve_source(weights: str, base: str | None = None, lora: str | None = None) -> WanSource:
    """The parts of the Wan model at ``weights`` (see the module docstring for the accepted layouts).

    Raises:
        WeightsError: a path is missing, or a folder / file is none of the accepted layouts.
    """
    path = _local_or_cached(weights)
    if lora is not None:
        lp = Path(lora).expanduser()
        if not lp.is_file():
            raise WeightsError(f"LoRA file {lora} does not exist")
        if not lp.name.endswith((*PT_SUFFIXES, ".safetensors")):
            raise WeightsError(f"LoRA file {lora} must be a .pt or .safetensors file")
    if path.is_dir():
        if base is not None:
            raise WeightsError(f"--base is for a bare .pt / .safetensors file; {weights} is a folder with a config")
        return _resolve_folder(path, weights, lora)
    if path.name.endswith(PT_SUFFIXES):
        kind = "pt"
    elif path.name.endswith(".safetensors"):
        kind = "safetensors"
    else:
        raise WeightsError(f"{weights} is not a folder, .pt or .safetensors file")
    parts: dict = dict(text_encoder_dir=None, tokenizer_dir=None, vae=None, original_text_encoder=None)
    config, config_from = None, None
    if base is not None:
        bp = _local_or_cached(base)
        if not bp.is_dir():
            raise WeightsError(f"--base {base} is not a folder")
        b = _resolve_folder(bp, base, None, need_files=False)  # only its config and parts are used
        config, config_from = b.config, b.config_from
        parts = dict(text_encoder_dir=b.text_encoder_dir, tokenizer_dir=b.tokenizer_dir, vae=b.vae,
                     original_text_encoder=b.original_text_encoder)  # fmt: skip
    elif kind == "safetensors":
        config = _metadata_config(path)
        config_from = f"{weights} (metadata)" if config is not None else None
    return WanSource(kind, weights, (str(path),), config, **parts, lora=lora, base=base, config_from=config_from)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _local_or_cached(name: str) -> Path:
    """A local path, else a Hugging Face repo id (``ORG/NAME``) found in the local cache, offline."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _REPO_ID.match(name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or no huggingface_hub): say how to get it
            raise WeightsError(
                f"{name} is neither a local path nor in the Hugging Face cache; nothing is downloaded at run time: "
                f"run `hf download {name}` (huggingface-cli download) first"
            ) from None
    raise WeightsError(f"{name} does not exist")


def _resolve_folder(path: Path, weights: str, lora: str | None, need_files: bool = True) -> WanSource:
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        path = _hf_snapshot(path)
    none = dict(text_encoder_dir=None, tokenizer_dir=None, vae=None, original_text_encoder=None)
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        cls = (index.get("transformer") or ["", "no transformer"])[-1]
        if cls != "WanTransformer3DModel":
            raise WeightsError(f"{weights} is a pipeline whose transformer is {cls}, not WanTransformer3DModel")
        t = path / "transformer"
        if not (t / "config.json").is_file():
            raise WeightsError(f"{weights} is a pipeline folder without transformer/config.json")
        files, config = _diffusers_transformer(t, need_files)
        return WanSource(
            "diffusers-pipeline", weights, files, config, **_pipeline_parts(path),
            lora=lora, base=None, config_from=str(t / "config.json"),
        )  # fmt: skip
    if not (path / "config.json").is_file():
        raise WeightsError(
            f"{weights} is not a diffusers transformer or pipeline folder nor an original Wan2.1 folder "
            "(no config.json or model_index.json)"
        )
    raw = _read_json(path / "config.json")
    if "dim" in raw and "num_heads" in raw:  # the original Wan repository's config.json
        try:
            config = original_config_to_diffusers(raw)
        except ValueError as e:
            raise WeightsError(f"{path / 'config.json'}: {e}") from None
        te, tok, vae = path / "models_t5_umt5-xxl-enc-bf16.pth", path / "google" / "umt5-xxl", path / "Wan2.1_VAE.pth"
        return WanSource(
            "wan-original", weights, _weight_files(path) if need_files else (), config,
            text_encoder_dir=None, tokenizer_dir=str(tok) if tok.is_dir() else None,
            vae=str(vae) if vae.is_file() else None, original_text_encoder=str(te) if te.is_file() else None,
            lora=lora, base=None, config_from=f"{path / 'config.json'} (original Wan, converted)",
        )  # fmt: skip
    files, config = _diffusers_transformer(path, need_files)
    # a pipeline's transformer/ given directly still finds its text encoder beside it
    parts = _pipeline_parts(path.parent) if (path.parent / "model_index.json").is_file() else none
    return WanSource(
        "diffusers-transformer", weights, files, config, **parts,
        lora=lora, base=None, config_from=str(path / "config.json"),
    )  # fmt: skip


def _pipeline_parts(root: Path) -> dict:
    def folder(name: str) -> str | None:
        return str(root / name) if (root / name).is_dir() else None

    return dict(text_encoder_dir=folder("text_encoder"), tokenizer_dir=folder("tokenizer"), vae=folder("vae"),
                original_text_encoder=None)  # fmt: skip


def _diffusers_transformer(folder: Path, need_files: bool) -> tuple[tuple[str, ...], dict]:
    config = _read_json(folder / "config.json")
    cls = config.get("_class_name", "WanTransformer3DModel")
    if cls != "WanTransformer3DModel" or "num_attention_heads" not in config:
        raise WeightsError(f"{folder / 'config.json'} is a {cls} config, not a WanTransformer3DModel one")
    return (_weight_files(folder) if need_files else ()), config


def _weight_files(folder: Path) -> tuple[str, ...]:
    """The transformer's safetensors files: the index's shards, the single file, or the one variant there is."""
    index = folder / f"{WEIGHTS_NAME}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise WeightsError(f"{index} lists no shards")
        lost = [s for s in shards if not (folder / s).is_file()]
        if lost:
            raise WeightsError(f"{index} lists {len(lost)} missing shard(s), e.g. {lost[0]}")
        return tuple(str(folder / s) for s in shards)
    single = folder / f"{WEIGHTS_NAME}.safetensors"
    if single.is_file():
        return (str(single),)
    found = sorted(folder.glob(f"{WEIGHTS_NAME}*.safetensors"))
    if len(found) == 1:
        return (str(found[0]),)
    if found:
        raise WeightsError(f"{folder} holds {len(found)} weight files and no index: {', '.join(f.name for f in found)}")
    if list(folder.glob(f"{WEIGHTS_NAME}*.bin")):
        raise WeightsError(f"{folder} has only .bin (pickle) weights; longroll reads safetensors only")
    raise WeightsError(f"{folder} has no {WEIGHTS_NAME}*.safetensors")


def _hf_snapshot(entry: Path) -> Path:
    """The snapshot of a Hugging Face cache entry ``models--ORG--NAME``: refs/main's, else the newest."""
    ref = entry / "refs" / "main"
    if ref.is_file() and (entry / "snapshots" / ref.read_text().strip()).is_dir():
        return entry / "snapshots" / ref.read_text().strip()
    snaps = [d for d in (entry / "snapshots").iterdir() if d.is_dir()]
    snaps.sort(key=lambda d: (d.stat().st_mtime, d.name))
    if not snaps:
        raise WeightsError(f"{entry} is a Hugging Face cache entry with no snapshot")
    return snaps[-1]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} is not readable JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return data


def _metadata_config(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        raise WeightsError(f"{path} is not a readable safetensors file ({_one_line(e)})") from None
    if "config" not in meta:
        return None
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise WeightsError(f"{path}: its 'config' metadata is not JSON") from None
    return config if isinstance(config, dict) else None


# ---- reading tensors -----------------------------------------------------------------------------
def load_state_dict(src: WanSource, ema: bool = True) -> dict[str, torch.Tensor]:
    """The transformer's tensors in diffusers names (LoRA merged), dtypes as stored.

    Args:
        ema: a Self-Forcing ``.pt``'s ``generator_ema`` (when it has one); False: its ``generator``.
    Raises:
        WeightsError: unreadable files, a checkpoint without generator weights, a LoRA that does not fit.
    """
    return _load(src, ema, meta=False)


def check_source(src: WanSource, config: dict | None = None, ema: bool = True) -> None:
    """Check keys and shapes of ``src`` (LoRA included) against ``config`` (default: its own) without
    reading tensor data: safetensors headers, memory-mapped ``.pt`` files, the LoRA merge on meta tensors.

    Raises:
        WeightsError: as :func:`load_state_dict` and :func:`check_keys`.
    """
    sd = _load(src, ema, meta=True)
    config = config if config is not None else src.config
    check_keys(sd, config)  # None: the shapes the tensors imply


def diffusers_config(src: WanSource) -> dict | None:
    return src.config


def _load(src: WanSource, ema: bool, meta: bool) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in src.transformer_files:
        part = _read_pt_generator(Path(f), ema, meta) if src.kind == "pt" else _read_safetensors(Path(f), meta)
        dup = sd.keys() & part.keys()
        if dup:
            raise WeightsError(f"{f} repeats {len(dup)} tensors of another shard, e.g. {min(dup)}")
        sd.update(part)
    sd = _normalize(sd, src.weights)
    if src.lora is not None:
        sd = merge_lora(sd, _read_lora(Path(src.lora), meta))
    return sd


def _normalize(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Wrapper prefixes stripped, original names renamed to diffusers'."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name = strip_wrappers(k)
        if name in out:
            raise WeightsError(f"{where}: two tensors are both {name} once wrapper prefixes are stripped")
        out[name] = v
    layout = key_layout(out)
    if layout == "mixed":
        raise WeightsError(f"{where} mixes original Wan and diffusers tensor names")
    return original_to_diffusers(out) if layout == "original" else out


def _read_safetensors(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not meta:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
            out = {}
            for k in f.keys():  # noqa: SIM118
                sl = f.get_slice(k)
                out[k] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float32), device="meta")
            return out
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        raise WeightsError(f"{path} is not a readable safetensors file ({_one_line(e)})") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped when the file's format allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped; the plain load below reports
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for a broken archive
        raise WeightsError(f"{path} cannot be read as a weights-only torch checkpoint ({_one_line(e)})") from None


def _read_pt_generator(path: Path, ema: bool, meta: bool) -> dict[str, torch.Tensor]:
    """The generator of a Self-Forcing / CausVid / LongLive checkpoint (never its critic), or a flat state dict."""
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    nested = [k for k in ("generator_ema", "generator", "model") if isinstance(obj.get(k), dict)]
    if nested:
        # as Self-Forcing / LongLive inference: generator_ema when asked for EMA, else generator ("model": older)
        order = ("generator_ema", "generator", "model") if ema else ("generator", "model")
        pick = next((k for k in order if k in nested), None)
        if pick is None:
            raise WeightsError(f"{path} has only generator_ema; drop --no-ema to use it")
        obj = obj[pick]
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others or not obj:
        raise WeightsError(f"{path} is not a generator state dict (non-tensor entries: {', '.join(others[:SHOW])})")
    return {k: v.to("meta") for k, v in obj.items()} if meta else obj


# ---- LoRA ----------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")  # optional peft adapter name


def _read_lora(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    """A LongLive LoRA file: ``{"generator_lora": peft state dict, "critic_lora": ...}`` or the bare peft dict."""
    if path.name.endswith(".safetensors"):
        return _read_safetensors(path, meta)
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("generator_lora"), dict):
        obj = obj["generator_lora"]  # as LongLive's inference: the generator's adapter
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"LoRA file {path} is neither a peft state dict nor a dict with 'generator_lora'")
    return {k: v.to("meta") for k, v in obj.items()} if meta else obj


def merge_lora(sd: dict, lora_sd: dict, alpha: float | None = None) -> dict:
    """``W += alpha / r * B @ A`` for every LoRA target of ``sd`` (diffusers names), in fp32, cast back.

    ``lora_sd`` is a peft-style LoRA state dict (``<module>.lora_A.weight`` ``[r, in]``, ``lora_B.weight``
    ``[out, r]``, optionally ``<module>.alpha``) with original or diffusers module names, peft / FSDP
    prefixes allowed. ``alpha`` overrides the file's; neither given: alpha = r (scale 1), LongLive's
    own default (``lora_alpha = alpha or rank``) and what its released rank-256 / alpha-256 adapter uses.

    Returns:
        a new dict; ``sd`` is not modified.
    Raises:
        WeightsError: keys that are not LoRA's, a lone A or B, targets ``sd`` lacks, shapes that do not fit.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in lora_sd.items():
        key = strip_wrappers(key)
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
        elif key.endswith(".alpha"):
            pairs.setdefault(key[: -len(".alpha")], {})["alpha"] = t
        else:
            raise WeightsError(f"not a LoRA state dict: unexpected tensor {key}")
    if not pairs:
        raise WeightsError("the LoRA state dict is empty")
    if key_layout(pairs) == "original":
        pairs = {original_key_to_diffusers(f"{m}.weight")[: -len(".weight")]: p for m, p in pairs.items()}
    lone = [m for m, p in pairs.items() if not {"A", "B"} <= p.keys()]
    if lone:
        raise WeightsError(f"LoRA has {len(lone)} modules without both lora_A and lora_B, e.g. {lone[0]}")
    absent = sorted(m for m in pairs if f"{m}.weight" not in sd)
    if absent:
        raise WeightsError(
            f"LoRA targets {len(absent)} of its {len(pairs)} modules that the weights lack: {', '.join(absent[:SHOW])}"
        )
    out = dict(sd)
    for module, p in pairs.items():
        w, a, b = sd[f"{module}.weight"], p["A"], p["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise WeightsError(
                f"LoRA {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the weight {tuple(w.shape)}"
            )
        r = a.shape[0]
        a_m = alpha if alpha is not None else p.get("alpha")
        a_m = r if a_m is None or isinstance(a_m, torch.Tensor) and a_m.is_meta else float(a_m)
        scale = a_m / r
        out[f"{module}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


# ---- identity ------------------------------------------------------------------------------------
def weights_digest(src: WanSource, ema: bool = True) -> str:
    """16 hex chars naming these weights, equal on every node that holds the same files.

    Per file: sha256 of its bytes (under 64 MiB), else of (size, first and last MiB). Combined
    over the transformer files, the LoRA, the config and, for a ``.pt``, which generator is read.
    """
    h = hashlib.sha256()
    for f in (*src.transformer_files, *((src.lora,) if src.lora else ())):
        h.update(_file_digest(Path(f)))
    h.update(json.dumps(src.config, sort_keys=True, default=list).encode())
    if src.kind == "pt":
        h.update(b"ema" if ema else b"generator")
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size < FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{size}\0".encode())  # not the name: a copy under another name is the same weights
            h.update(f.read(EDGE_HASH_BYTES))
            f.seek(size - EDGE_HASH_BYTES)
            h.update(f.read(EDGE_HASH_BYTES))
    return h.digest()
