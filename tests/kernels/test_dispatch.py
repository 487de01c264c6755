"""The dispatcher the generator calls: the Triton path equals the PyTorch path, per stream."""

from dataclasses import replace

import pytest
import torch

from ops import dispatch
from tests.kernels.util import DEVICE, RMS_TOL, assert_matches_reference, rms_rel

SCALE = 192**-0.5


def stream(s_q=48, heads=4, d_c=32, d_r=16, s_ctx=130, s_new=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return r(s_q, heads, d_c), r(s_q, heads, d_r), r(s_ctx, d_c), r(s_ctx, d_r), r(s_new, d_c), r(s_new, d_r)


def test_backend_names_are_checked():
    with pytest.raises(ValueError), dispatch.use_backend("cuda"):
        pass


def test_latent_triton_equals_torch():
    q, qr, c, r, _, _ = stream()
    with dispatch.use_backend("torch"):
        expect = dispatch.latent(q, qr, c, r, SCALE)
    with dispatch.use_backend("triton"):
        out = dispatch.latent(q, qr, c, r, SCALE)
    err = rms_rel(out.cpu(), expect.cpu())
    print(f"dispatch.latent triton vs torch: rms-rel {err:.2e}")
    assert out.shape == expect.shape and err <= RMS_TOL[torch.float32]


def test_latent_context_triton_equals_reference():
    q, qr, c, r, cn, rn = stream(s_ctx=70)
    valid = torch.arange(70, device=DEVICE) % 5 != 0
    c[~valid] = float("nan")
    with dispatch.use_backend("torch"):
        expect = dispatch.latent_context(q, qr, c, r, SCALE, k_valid=valid, ckv_new=cn, k_rope_new=rn)
    with dispatch.use_backend("triton"):
        out = dispatch.latent_context(q, qr, c, r, SCALE, k_valid=valid, ckv_new=cn, k_rope_new=rn)
    assert out[0].shape == (48, 4, 32) and out[1].shape == (48, 4)
    assert_matches_reference("latent_context", *out, *expect, torch.float32)


@pytest.mark.parametrize("head_group", [1, 4])
def test_sparse_latent_triton_equals_reference(head_group):
    q, qr, c, r, cn, rn = stream(s_ctx=260, seed=head_group)
    kw = dict(
        top_k=3,
        block_size=32,
        q_group=16,
        head_group=head_group,
        window_start=200,
        local_start=160,
        sink_len=32,
        ckv_new=cn,
        k_rope_new=rn,
    )
    with dispatch.use_backend("torch"):
        expect = dispatch.sparse_latent(q, qr, c, r, SCALE, **kw)
    with dispatch.use_backend("triton"):
        out = dispatch.sparse_latent(q, qr, c, r, SCALE, **kw)
    assert_matches_reference(f"sparse_latent head_group={head_group}", *out, *expect, torch.float32)


def test_generator_triton_path_equals_torch_path():
    """Three chunks of a small MLA model: the context grows, the window ring wraps, the sink stays."""
    from workers.config import ModelConfig
    from workers.generator import Generator
    from workers.types import StreamSpec

    cfg = replace(ModelConfig.from_name("tiny"), latent_height=16, latent_width=16, num_layers=2, window_frames=3)
    latents = {}
    for backend in ("torch", "triton"):
        with dispatch.use_backend(backend):
            gen = Generator(cfg, device=DEVICE)
            state = gen.new_stream(StreamSpec("s", seed=3))
            latents[backend] = torch.cat([gen.step([state])[0].latents for _ in range(3)])
    err = rms_rel(latents["triton"], latents["torch"])
    print(
        f"generator, 3 chunks, triton vs torch path: rms-rel {err:.2e}, "
        f"max-abs {(latents['triton'] - latents['torch']).abs().max():.2e}"
    )
    assert err <= RMS_TOL[torch.float32]
