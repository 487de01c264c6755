"""Wan-family video: `generate --vae` streams the VAE decode chunk by chunk into a lossless mp4 whose
frames equal diffusers' one-shot decode of the same latents; a VAE that does not fit is refused."""

import pytest
import torch
from safetensors.torch import load_file

from tests.workers.wan.test_generate_wan import generate, parts  # noqa: F401 - the module fixture
from workers.models.wan.vae import TINY_VAE_CONFIG, random_vae, to_uint8
from workers.video import read_mp4


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """The tiny random VAE with non-trivial latents_mean / latents_std (un-normalisation is checked too)."""
    g = torch.Generator().manual_seed(5)
    cfg = TINY_VAE_CONFIG | {"latents_mean": (0.3 * torch.randn(4, generator=g)).tolist(),
                             "latents_std": (0.5 + torch.rand(4, generator=g)).tolist()}  # fmt: skip
    root = tmp_path_factory.mktemp("vae") / "vae"
    random_vae(cfg, seed=3).save_pretrained(root)
    return root


def one_shot(vae_path, latents: torch.Tensor) -> torch.Tensor:
    """diffusers: un-normalise as WanPipeline does, then AutoencoderKLWan.decode of the whole sequence."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_path).eval()
    z = latents.permute(1, 0, 2, 3)[None]  # (F, C, h, w) -> (1, C, F, h, w)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return to_uint8(vae.decode(z / inv_std + mean).sample)


def test_generate_with_a_vae_writes_the_one_shot_decode_of_its_latents(parts, vae_dir, capsys, tmp_path):  # noqa: F811
    lat, video = tmp_path / "L.safetensors", tmp_path / "O.mp4"
    code, _, err = generate(capsys, "--weights", str(parts["diffusers"]), "--vae", str(vae_dir),
                            "--prompt-embeds", str(parts["embeds"]), "--chunks", "3", "--latents-out", str(lat),
                            "--out", str(video), "--lossless")  # fmt: skip
    assert code == 0, err
    latents = load_file(lat)["latents"]
    assert latents.shape == (9, 4, 8, 8)
    want = one_shot(vae_dir, latents)
    got = torch.from_numpy(read_mp4(video))
    assert got.shape == want.shape == (1 + 4 * 8, 64, 64, 3)
    diff = (got.int() - want.int()).abs().max().item()
    print(f"streamed lossless mp4 vs diffusers one-shot decode: max |diff| {diff}/255")
    assert diff <= 1 and want.float().std() > 10  # a real picture, not a clamped flat one


def test_a_vae_whose_latents_do_not_fit_the_transformer_is_refused(parts, capsys, tmp_path):  # noqa: F811
    bad = tmp_path / "vae16"
    random_vae(TINY_VAE_CONFIG | {"z_dim": 8, "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8}).save_pretrained(bad)
    out = tmp_path / "O.mp4"
    code, _, err = generate(capsys, "--weights", str(parts["diffusers"]), "--vae", str(bad),
                            "--prompt-embeds", str(parts["embeds"]), "--chunks", "1", "--out", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --vae "), err
    assert "8 channels" in err and not out.exists()


def test_a_wan_video_without_a_vae_is_refused(parts, capsys, tmp_path):  # noqa: F811
    code, _, err = generate(capsys, "--weights", str(parts["diffusers"]), "--prompt-embeds", str(parts["embeds"]),
                            "--chunks", "1", "--out", str(tmp_path / "O.mp4"))  # fmt: skip
    assert code == 2 and "needs the Wan2.1 VAE" in err, err


def test_a_pipeline_folder_brings_its_own_vae(parts, vae_dir, capsys, tmp_path):  # noqa: F811
    import shutil

    pipe = tmp_path / "pipeline"
    shutil.copytree(parts["pipeline"], pipe)
    shutil.rmtree(pipe / "vae", ignore_errors=True)
    shutil.copytree(vae_dir, pipe / "vae")
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    common = ["--prompt-embeds", str(parts["embeds"]), "--chunks", "2", "--lossless"]
    assert generate(capsys, "--weights", str(pipe), "--out", str(a), *common)[0] == 0
    separate = ["--weights", str(parts["diffusers"]), "--vae", str(vae_dir)]
    code, _, err = generate(capsys, *separate, "--out", str(b), *common)
    assert code == 0, err
    va, vb = read_mp4(a), read_mp4(b)
    assert va.shape == (1 + 4 * 5, 64, 64, 3) and (va == vb).all()
