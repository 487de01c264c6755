"""The Wan2.1 VAE decoder, streamed: one latent chunk in, its video frames (uint8 RGB) out, per stream.

diffusers' ``AutoencoderKLWan._decode`` runs ``post_quant_conv`` over all latents and then the
decoder one latent frame at a time, carrying a causal-conv feature cache (``vae._feat_map``): the
last 2 input frames of every causal 3-D conv. :class:`StreamDecoder` keeps that cache per stream
instead of per call, so chunk after chunk gives exactly the frames of one ``vae.decode`` of the whole
latent sequence: 1 + 4 * (F - 1) frames for the stream's first chunk of F latent frames, 4 * F after.

The cache is too large to checkpoint (about 1.8 GiB per stream at 480x832 in bf16, see
:func:`decoder_cache_bytes`), so a resumed stream rebuilds it with :meth:`StreamDecoder.warmup` from
the last :data:`RESUME_LATENT_FRAMES` latent frames before the resume point.

``load_vae`` reads a diffusers ``vae/`` folder, a diffusers WanPipeline folder (its ``vae/``), the
original ``Wan2.1_VAE.pth`` (``torch.load(weights_only=True)``, names mapped by ``vae_keys.py``) or
an original Wan2.1 folder holding it.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from pathlib import Path

import structlog
import torch

from workers.models.wan.keys import WeightsError, _one_line
from workers.models.wan.vae_keys import SHOW, infer_original_config, key_map

log = structlog.get_logger(__name__)

# Latent frames replayed by StreamDecoder.warmup before a resume point. Found empirically with
# `python bench/vae.py --sweep tiny,real` (CPU fp32, every parameter random, 32x32 px): the smallest K
# whose warm-up from an empty cache rebuilds the uninterrupted decode's cache, and so its frames, bit for
# bit: 38 for the Wan2.1 architecture (z_dim 16, base_dim 96; K = 37 still differs by 6.6e-7 in float,
# 0 in uint8), 30 for REAL_MODELS.md's tiny VAE. Both are the decoder's temporal receptive field (its 3-tap
# causal convs at 1x, 2x and 4x the latent frame rate), so 38 suffices for any Wan2.1 VAE weights: it is a
# property of the architecture.
RESUME_LATENT_FRAMES = 38

ORIGINAL_NAME = "Wan2.1_VAE.pth"
WEIGHTS_STEM = "diffusion_pytorch_model"
PT_SUFFIXES = (".pth", ".pt", ".ckpt")
ARCH_KEYS = ("z_dim", "base_dim", "dim_mult", "num_res_blocks", "temperal_downsample")

# REAL_MODELS.md's tiny AutoencoderKLWan (builds in milliseconds); tests and bench/vae.py use it
TINY_VAE_CONFIG = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
)  # fmt: skip


def wan21_vae_config() -> dict:
    """The real Wan2.1 VAE's config: diffusers' ``AutoencoderKLWan`` defaults (z_dim 16, base_dim 96,
    dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsampling [False, True, True], the 16 latents_mean
    / latents_std of Wan2.1)."""
    from diffusers import AutoencoderKLWan

    sig = inspect.signature(AutoencoderKLWan.__init__).parameters
    return {k: list(p.default) if isinstance(p.default, list) else p.default for k, p in sig.items() if k != "self"}


# ---- loading -----------------------------------------------------------------------------------
def load_vae(path, device="cpu", dtype: torch.dtype = torch.float32, config: dict | None = None):
    """An ``AutoencoderKLWan`` (eval, no grad) on ``device`` in ``dtype`` from a VAE path.

    ``path``: a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model*.safetensors), a
    diffusers pipeline folder (its vae/), an original ``Wan2.1_VAE.pth``, or an original Wan2.1 folder
    holding one. ``config`` replaces the file's config; for a ``.pth`` without one the architecture is
    read off the tensor shapes, with Wan2.1's latents_mean / latents_std when z_dim is 16 (else 0 / 1).

    Raises:
        ValueError (``WeightsError``): a missing path, a folder of another layout, an unreadable file,
            tensors that do not map onto the config's model.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"no VAE at {p}: no such file or folder")
    if p.is_dir():
        if (p / ORIGINAL_NAME).is_file():  # an original Wan2.1 folder (its config.json is the transformer's)
            p = p / ORIGINAL_NAME
        elif not (p / "config.json").is_file() and ((p / "vae").is_dir() or (p / "model_index.json").is_file()):
            p = p / "vae"  # a diffusers pipeline folder
    if p.is_file() and p.suffix in PT_SUFFIXES:
        sd = _read_pth(p)
        if config is None:
            arch = infer_original_config(sd)
            config = wan21_vae_config() | arch
            if arch["z_dim"] != 16:
                config |= dict(latents_mean=[0.0] * arch["z_dim"], latents_std=[1.0] * arch["z_dim"])
                log.warning("vae.no_latent_stats", path=str(p), z_dim=arch["z_dim"], using="mean 0, std 1")
        cfg = _check_config(config, p)
        sd = _rename(sd, cfg, p)
    elif p.is_dir() and (p / "config.json").is_file():
        cfg = _check_config(config if config is not None else _read_json(p / "config.json"), p)
        sd = _read_safetensors(p)
    else:
        raise WeightsError(
            f"no Wan VAE at {p}: expected a folder with config.json + {WEIGHTS_STEM}.safetensors, a pipeline "
            f"folder with vae/, or {ORIGINAL_NAME}"
        )
    vae = _build(cfg, sd, p, torch.device(device), dtype)
    log.info("vae.loaded", path=str(p), z_dim=cfg["z_dim"], base_dim=cfg["base_dim"], dtype=str(dtype))
    return vae


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {f}: {_one_line(e)}") from None


def _read_pth(f: Path) -> dict:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many kinds; all mean "not a weights file"
        raise WeightsError(f"cannot read {f} with torch.load(weights_only=True): {_one_line(e)}") from None
    if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = next((sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict)), sd)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{f} is not a state dict of tensors")
    return sd


def _read_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{WEIGHTS_STEM}*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} has config.json but no {WEIGHTS_STEM}*.safetensors")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"cannot read {f}: {_one_line(e)}") from None
    return sd


def _check_config(config, where: Path) -> dict:
    cfg = wan21_vae_config() | {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cls = dict(config).get("_class_name", "AutoencoderKLWan")
    if cls != "AutoencoderKLWan":
        raise WeightsError(f"{where} holds a {cls}, not an AutoencoderKLWan")
    if cfg.get("is_residual") or cfg.get("patch_size") not in (None, 1) or cfg.get("attn_scales"):
        raise WeightsError(f"{where}: only the Wan2.1 VAE is supported (not is_residual / patch_size / attn_scales)")
    if len(cfg["latents_mean"]) != cfg["z_dim"] or len(cfg["latents_std"]) != cfg["z_dim"]:
        raise WeightsError(f"{where}: latents_mean / latents_std do not have z_dim = {cfg['z_dim']} entries")
    return cfg


def _meta_vae(cfg: dict):
    from diffusers import AutoencoderKLWan

    try:
        with torch.device("meta"):  # no random init of 127 M parameters only to overwrite them
            return AutoencoderKLWan.from_config(cfg)
    except Exception as e:
        raise WeightsError(f"config does not build an AutoencoderKLWan ({_one_line(e)})") from None


def _rename(sd: dict, cfg: dict, where: Path) -> dict:
    names = key_map(list(_meta_vae(cfg).state_dict()), cfg)  # {original: diffusers}
    unknown = sorted(k for k in sd if k not in names)
    if unknown:
        raise WeightsError(
            f"{where}: {len(unknown)} tensors have no diffusers AutoencoderKLWan name, e.g. {', '.join(unknown[:SHOW])}"
        )
    return {names[k]: v for k, v in sd.items()}


def _build(cfg: dict, sd: dict, where: Path, device: torch.device, dtype: torch.dtype):
    vae = _meta_vae(cfg)
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    if missing or unexpected:
        raise WeightsError(
            f"{where}: {len(missing)} missing and {len(unexpected)} unexpected tensors for this AutoencoderKLWan "
            f"config (missing: {', '.join(missing[:SHOW]) or '-'}; unexpected: {', '.join(unexpected[:SHOW]) or '-'})"
        )
    bad = [k for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        raise WeightsError(f"{where}: {len(bad)} tensors have other shapes than the config's, e.g. {bad[0]} "
                           f"{tuple(sd[bad[0]].shape)} (config: {want[bad[0]]})")  # fmt: skip
    # own, aligned memory: tensors mmapped from a safetensors file may start at any 8-byte offset, and CPU
    # kernels then take other code paths (results not bit-identical to the same weights loaded otherwise)
    sd = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in sd.items()}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def random_vae(config: dict | None = None, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """An ``AutoencoderKLWan`` with EVERY parameter random (Wan zero-initialises some, and checks would then
    pass trivially), scaled so activations stay O(1) and the decoded video is not all clamped.

    Weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.1^2), RMS-norm gammas ~ 1 + N(0, 0.2^2); drawn on the CPU
    from ``seed``, so the same on every device.
    """
    vae = _meta_vae(_check_config(config if config is not None else wan21_vae_config(), Path("random_vae")))
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in vae.state_dict().items():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):
            sd[name] = 1 + 0.2 * noise
        elif name.endswith("bias"):
            sd[name] = 0.1 * noise
        else:
            sd[name] = noise / math.sqrt(max(1, p[0].numel()))
    vae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


# ---- the streaming decoder ---------------------------------------------------------------------
def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [1, 3, N, H, W] in [-1, 1] -> uint8 [N, H, W, 3] on the CPU, bit for bit as diffusers'
    ``VideoProcessor.postprocess_video(output_type="pil")`` (and "np" followed by its own uint8 step):
    ``(x * 0.5 + 0.5).clamp(0, 1)`` in the decode dtype, then float32, ``(x * 255).round()`` with
    round-half-to-even (numpy's and torch's), then uint8."""
    img = (video[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).float()
    return (img * 255).round().to(torch.uint8).cpu()


class StreamDecoder:
    """One stream's VAE decode: the causal-conv feature cache of diffusers' ``_decode``, kept between chunks.

    Not thread-safe; the VAE modules (``vae``) are shared by every stream's decoder, the cache is not.
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        p = next(vae.parameters())
        self.device, self.dtype, self.z_dim = p.device, p.dtype, int(cfg.z_dim)
        self._slots = int(vae._cached_conv_counts["decoder"])
        self._rep = _rep_slots(_config_key(cfg))
        z = self.z_dim
        # as WanPipeline: latents / (1 / std) + mean, both made in the latents' dtype (the VAE's)
        self._mean = torch.tensor(cfg.latents_mean).view(1, z, 1, 1, 1).to(self.device, self.dtype)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, z, 1, 1, 1).to(self.device, self.dtype)
        self.reset()

    def reset(self) -> None:
        """Back to the stream's start (the next chunk's first latent frame decodes to one frame)."""
        self._cache: list = [None] * self._slots
        self._started = False

    @torch.no_grad()
    def _run(self, latents: torch.Tensor) -> torch.Tensor | None:
        if latents.ndim != 4 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [F, {self.z_dim}, h, w], got {list(latents.shape)}")
        if latents.shape[0] == 0:
            return None
        z = latents.to(self.device, self.dtype).permute(1, 0, 2, 3).unsqueeze(0).contiguous()
        x = self.vae.post_quant_conv(z / self._inv_std + self._mean)
        outs = []
        for i in range(x.shape[2]):
            first = not self._started
            outs.append(self.vae.decoder(x[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=first))
            self._started = True
        return torch.cat(outs, 2).clamp(-1.0, 1.0)

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Like :meth:`decode`, but the clamped float video [1, 3, N, H, W] in [-1, 1] (None for F = 0)."""
        return self._run(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One chunk of NORMALISED latents [F, C, h, w] (as the transformer makes them) -> uint8 RGB
        [N, 8h, 8w, 3] on the CPU, N = 1 + 4 * (F - 1) for the stream's first chunk, 4 * F after."""
        video = self._run(latents)
        if video is None:
            s = int(self.vae.spatial_compression_ratio)
            return torch.zeros(0, latents.shape[-2] * s, latents.shape[-1] * s, 3, dtype=torch.uint8)
        return to_uint8(video)

    def warmup(self, latents_before: torch.Tensor, *, starts_stream: bool = False,
               frames: int = RESUME_LATENT_FRAMES) -> None:  # fmt: skip
        """Rebuild the cache for a resume: decode (and discard) the latent frames just before it.

        ``latents_before`` [F, C, h, w]: the stream's last latent frames before the resume point; its last
        ``frames`` are replayed. ``starts_stream``: they are the stream's first frames (a resume point at
        or below ``frames``): replayed from the stream start, exact at any F. Otherwise the replay starts
        in the non-first mode from an empty history: each ``"Rep"`` marker (upsample3d's "no time conv
        yet" state, set by a stream's first latent frame) is put in place first, which makes its temporal
        conv see zeros like every other conv's padding and emit 2 frames per input frame from the first
        replayed frame on. Decoding after the warm-up continues with 4 frames per latent frame.

        Raises:
            ValueError: fewer than ``frames`` latent frames and not ``starts_stream``.
        """
        self.reset()
        if not starts_stream:
            if latents_before.shape[0] < frames:
                raise ValueError(
                    f"warmup needs the last {frames} latent frames before the resume point (got "
                    f"{latents_before.shape[0]}); pass starts_stream=True if they are the stream's first"
                )
            latents_before = latents_before[latents_before.shape[0] - frames :]
            for i in self._rep:
                self._cache[i] = "Rep"
            self._started = True
        self._run(latents_before)

    def cache_nbytes(self) -> int:
        """Bytes held by this stream's feature cache now."""
        return sum(t.nbytes for t in self._cache if isinstance(t, torch.Tensor))


# ---- sizes without allocating ------------------------------------------------------------------
def _config_key(config) -> str:
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=list)


def _meta_cache(key: str, lat_h: int, lat_w: int, dtype: torch.dtype, frames: int) -> list:
    """The decoder's feature cache after ``frames`` latent frames, run on the meta device (nothing allocated)."""
    vae = torch.nn.Module.to(_meta_vae(json.loads(key)), dtype)  # (ModelMixin.to warns about fp32 modules)
    cache: list = [None] * int(vae._cached_conv_counts["decoder"])
    with torch.no_grad():
        x = vae.post_quant_conv(torch.empty(1, vae.config.z_dim, frames, lat_h, lat_w, device="meta", dtype=dtype))
        for i in range(frames):
            vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
    return cache


@functools.lru_cache(maxsize=16)
def _rep_slots(key: str) -> tuple[int, ...]:
    """The cache slots of the upsample3d time convs (where a stream's first latent frame leaves "Rep")."""
    return tuple(i for i, c in enumerate(_meta_cache(key, 2, 2, torch.float32, 1)) if isinstance(c, str))


def decoder_cache_bytes(vae_config, height: int, width: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one stream's decoder feature cache at ``height`` x ``width`` pixels in ``dtype``.

    Nothing is allocated: the decoder runs on the meta device for 2 latent frames (after which every cached
    conv input holds its full 2 frames, the steady state) and the cached tensors' sizes are summed.
    """
    s = int(dict(vae_config).get("scale_factor_spatial") or 8)
    if height % s or width % s:
        raise ValueError(f"{height}x{width} px is not a multiple of the VAE's spatial stride {s}")
    cache = _meta_cache(_config_key(wan21_vae_config() | dict(vae_config)), height // s, width // s, dtype, 2)
    return sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor))
