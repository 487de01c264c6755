"""The streaming Wan VAE decoder (workers/models/wan/vae.py) against diffusers' one-shot decode, on the CPU.

A tiny random AutoencoderKLWan (REAL_MODELS.md's config, every parameter random, non-trivial latent
means / stds so the un-normalisation is checked) saved as a diffusers folder, a pipeline folder and an
original-layout ``Wan2.1_VAE.pth`` made by inverting the loader's key map.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from workers.models.wan.vae import (
    RESUME_LATENT_FRAMES,
    TINY_VAE_CONFIG,
    StreamDecoder,
    decoder_cache_bytes,
    load_vae,
    random_vae,
    to_uint8,
    wan21_vae_config,
)
from workers.models.wan.vae_keys import infer_original_config, key_map

CONFIG = TINY_VAE_CONFIG | dict(latents_mean=[0.3, -0.5, 0.1, 0.8], latents_std=[1.7, 0.6, 2.3, 1.1])
LAT_HW = (4, 6)  # latent frame -> 32x48 px


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    vae = random_vae(CONFIG, seed=0)
    vae.save_pretrained(root / "vae")
    pipe = root / "pipeline"
    vae.save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "vae": ["diffusers", "X"]}))
    to_original = {d: o for o, d in key_map(list(vae.state_dict()), CONFIG).items()}
    (root / "wan").mkdir()  # an original Wan2.1 folder: the transformer's config.json beside the VAE
    (root / "wan" / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 1536}))
    pth = root / "wan" / "Wan2.1_VAE.pth"
    torch.save({to_original[k]: v.clone() for k, v in vae.state_dict().items()}, pth)
    return dict(root=root, folder=root / "vae", pipeline=pipe, pth=pth, original_dir=root / "wan")


def latents(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(frames, CONFIG["z_dim"], *LAT_HW, generator=torch.Generator().manual_seed(seed))


def one_shot(vae, z: torch.Tensor) -> np.ndarray:
    """WanPipeline's tail: un-normalise, vae.decode of the whole sequence, VideoProcessor to uint8 (PIL)."""
    lat = z.permute(1, 0, 2, 3).unsqueeze(0).contiguous().to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
    video = vae.decode(lat / std + mean, return_dict=False)[0]
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pil")[0]
    return np.stack([np.asarray(f) for f in frames])


def chunked(dec: StreamDecoder, z: torch.Tensor, sizes) -> list[torch.Tensor]:
    out, i = [], 0
    for n in sizes:
        out.append(dec.decode(z[i : i + n]))
        i += n
    return out


@pytest.mark.parametrize("sizes", [(3, 3, 1), (1, 2, 4), (7,)])
def test_chunked_decode_equals_one_shot(files, sizes):
    vae = load_vae(files["folder"])
    z = latents(sum(sizes))
    parts = chunked(StreamDecoder(vae), z, sizes)
    assert [p.shape[0] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * n for n in sizes[1:]]
    got, want = torch.cat(parts).numpy(), one_shot(vae, z)
    assert got.dtype == np.uint8 and got.shape == want.shape == (1 + 4 * (sum(sizes) - 1), 32, 48, 3)
    assert want.std() > 0 and (want > 0).mean() > 0.5 and (want < 255).mean() > 0.5  # not all clamped
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= 1, f"max uint8 difference {diff}"
    assert diff == 0  # exactly equal on this CPU (fp32): same shapes per call, same kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_uint8_rounds_as_video_processor(dtype):
    # every level's half-way point (x * 0.5 + 0.5) * 255 = k + 0.5 (round half to even), values outside [-1, 1]
    halves = (torch.arange(256, dtype=torch.float64) + 0.5) / 255 * 2 - 1
    x = torch.cat([halves, torch.linspace(-1.2, 1.2, 3 * 4 * 5 * 6 - 256, dtype=torch.float64)])
    video = x.to(dtype)[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))].view(1, 3, 4, 5, 6)
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pil")[0]
    assert torch.equal(to_uint8(video), torch.from_numpy(np.stack([np.asarray(f) for f in frames])))


def test_pth_folder_pipeline_decode_identically(files):
    z = latents(5, seed=2)
    ref_vae = load_vae(files["folder"])
    ref = torch.cat(chunked(StreamDecoder(ref_vae), z, (3, 2)))
    for path, cfg in ((files["pth"], CONFIG), (files["original_dir"], CONFIG), (files["pipeline"], None)):
        vae = load_vae(path, config=cfg)
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ref_vae.state_dict().values()))
        assert torch.equal(torch.cat(chunked(StreamDecoder(vae), z, (3, 2))), ref), path
    inferred = load_vae(files["pth"])  # no config: the architecture from the tensor shapes, mean 0 / std 1
    for k in ("z_dim", "base_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        assert inferred.config[k] == CONFIG[k], k
    assert list(inferred.config.latents_std) == [1.0] * 4


def test_infer_real_architecture():
    with torch.device("meta"):
        vae = AutoencoderKLWan(**wan21_vae_config())
    sd = {o: vae.state_dict()[d] for o, d in key_map(list(vae.state_dict()), wan21_vae_config()).items()}
    assert len(sd) == len(vae.state_dict())
    arch = infer_original_config(sd)
    assert arch == dict(z_dim=16, base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[False, True, True])  # fmt: skip
    for name in ("decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.time_conv.weight",
                 "decoder.middle.1.to_qkv.weight", "conv2.weight", "decoder.head.2.weight"):  # fmt: skip
        assert name in sd, name  # names of the original checkpoint (diffusers' convert_vae)


def test_warmup_resume_equals_uninterrupted(files):
    vae = load_vae(files["folder"])
    k = RESUME_LATENT_FRAMES
    t = 3 * (k // 3 + 2)  # a chunk boundary past K: the middle of the stream
    z = latents(t + 6, seed=3)
    full = StreamDecoder(vae)
    chunked(full, z, [3] * (t // 3))
    cache_at_t = [c.clone() if isinstance(c, torch.Tensor) else c for c in full._cache]
    want = torch.cat(chunked(full, z[t:], (3, 3)))

    dec = StreamDecoder(vae)
    dec.warmup(z[:t])  # its last K latent frames, from an empty cache
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(dec._cache, cache_at_t))
    got = torch.cat(chunked(dec, z[t:], (3, 3)))
    assert got.shape[0] == 4 * 6 and torch.equal(got, want)

    short = StreamDecoder(vae)  # too short a replay gives other frames: K matters for this model
    short.warmup(z[:t], frames=k // 3)
    assert not torch.equal(torch.cat(chunked(short, z[t:], (3, 3))), want)
    with pytest.raises(ValueError, match="warmup needs"):
        StreamDecoder(vae).warmup(z[: k - 1])


def test_warmup_near_stream_start(files):
    vae = load_vae(files["folder"])
    z = latents(9, seed=4)
    full = StreamDecoder(vae)
    chunked(full, z, (3, 3))
    want = full.decode(z[6:9])
    dec = StreamDecoder(vae)
    dec.warmup(z[:6], starts_stream=True)
    assert torch.equal(dec.decode(z[6:9]), want)
    fresh = StreamDecoder(vae)
    fresh.warmup(z[:0], starts_stream=True)  # resume at frame 0: a fresh stream
    assert fresh.decode(z[:0]).shape == (0, 32, 48, 3)
    assert fresh.decode(z[:3]).shape[0] == 9


def test_decoder_cache_bytes_matches_a_real_decode(files):
    vae = load_vae(files["folder"])
    dec = StreamDecoder(vae)
    dec.decode(latents(1))
    sizes = [dec.cache_nbytes()]
    for n in (1, 3, 2):
        dec.decode(latents(n))
        sizes.append(dec.cache_nbytes())
    assert sizes[0] < sizes[1] == sizes[2] == sizes[3], sizes  # full (2 frames per conv) after 2 latent frames
    assert decoder_cache_bytes(vae.config, 32, 48, torch.float32) == sizes[1]
    assert decoder_cache_bytes(vae.config, 32, 48, torch.bfloat16) * 2 == sizes[1]
    bf16 = load_vae(files["folder"], dtype=torch.bfloat16)
    dec = StreamDecoder(bf16)
    dec.decode(latents(2))
    assert dec.cache_nbytes() == decoder_cache_bytes(bf16.config, 32, 48, torch.bfloat16)
    real = decoder_cache_bytes(wan21_vae_config(), 480, 832, torch.bfloat16)
    assert 1.6 * 2**30 < real < 2.0 * 2**30, real / 2**30  # REAL_MODELS.md: about 1.8 GiB


def one_line_error(path, **kw) -> str:
    with pytest.raises(ValueError) as e:
        load_vae(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_paths_raise_one_line(files, tmp_path):
    assert "no such file" in one_line_error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "expected a folder" in one_line_error(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(CONFIG))
    assert "no diffusion_pytorch_model" in one_line_error(tmp_path / "noweights")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert "not an AutoencoderKLWan" in one_line_error(tmp_path / "other")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    assert "weights_only" in one_line_error(tmp_path / "junk.pth")
    torch.save({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "transformer.pth")
    assert "not an original Wan2.1 VAE" in one_line_error(tmp_path / "transformer.pth")
    sd = torch.load(files["pth"], weights_only=True)
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    assert "no diffusers AutoencoderKLWan name" in one_line_error(tmp_path / "extra.pth", config=CONFIG)
    del sd["decoder.extra.weight"], sd["decoder.head.2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    assert "1 missing" in one_line_error(tmp_path / "missing.pth", config=CONFIG)
    assert "shapes" in one_line_error(files["pth"], config=CONFIG | dict(base_dim=16))
