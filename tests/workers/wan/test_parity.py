"""The Wan family against diffusers' WanTransformer3DModel on the same random weights (the oracle).

Every chunk c at every denoising step s: longroll's prediction x0 from [cache | noisy chunk] must equal
diffusers' forward over [clean chunks 0..c-1 at t=0 | noisy chunk c at t] with per-token timesteps and a
block-causal mask (plus the LongLive sink + local-window mask when the cache evicts).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from tests.workers.wan.models import random_transformer, tiny_cfg
from workers.config import ModelConfig
from workers.generator import Generator
from workers.models.wan.text import pad_prompt_embeds
from workers.types import StreamSpec

TOL = 1e-3  # fp32 relative error


class MaskedProcessor(WanAttnProcessor):
    """diffusers' own Wan attention, with a fixed attention mask (True = may attend)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def visible(cfg: ModelConfig, frames: int) -> torch.Tensor:
    """[frames, frames] bool: may a query of frame i see frame j (sink + local window + own chunk)."""
    f = torch.arange(frames)
    chunk = f // cfg.frames_per_chunk
    first = chunk * cfg.frames_per_chunk  # first frame of the query's chunk
    qf, kf = first[:, None], f[None, :]
    own = chunk[:, None] == chunk[None, :]
    sink = kf < torch.minimum(qf, torch.tensor(cfg.sink_frames))
    window = (kf < qf) & (kf >= torch.maximum(qf - cfg.window_frames, torch.tensor(cfg.sink_frames)))
    return own | sink | window


def oracle_x0(ref, cfg: ModelConfig, clean: torch.Tensor, x_t: torch.Tensor, sigma: float, text: torch.Tensor):
    """diffusers' x0 of the noisy chunk x_t [F, C, H, W] after the clean frames ``clean`` [F0, C, H, W]."""
    frames = torch.cat([clean, x_t])  # (F0 + F, C, H, W)
    t_f = cfg.tokens_per_frame
    mask = visible(cfg, len(frames)).repeat_interleave(t_f, 0).repeat_interleave(t_f, 1)  # frames -> tokens
    for block in ref.blocks:
        block.attn1.set_processor(MaskedProcessor(mask))
    timestep = torch.cat([torch.zeros(len(clean) * t_f), torch.full((len(x_t) * t_f,), sigma * 1000.0)])
    with torch.no_grad():
        # (F, C, H, W) -> (1, C, F, H, W)
        v = ref(frames.permute(1, 0, 2, 3)[None], timestep[None], text[None], return_dict=False)[0]
    v = v[0, :, len(clean) :].permute(1, 0, 2, 3)  # (C, F, H, W) -> (F, C, H, W) of the chunk
    return x_t - sigma * v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rollout(cfg: ModelConfig, chunks: int, seed: int = 0):
    ref = random_transformer(cfg, seed=seed + 1)
    gen = Generator(cfg)
    gen.family.model.transformer.load_state_dict(ref.state_dict(), strict=True)
    gen.trace = {}
    state = gen.new_stream(StreamSpec("s", seed=seed, prompt="a red fox in snow"))
    out = [gen.step([state])[0].latents for _ in range(chunks)]
    return ref, gen, state, out


@pytest.mark.parametrize(
    "preset, overrides, chunks",
    [
        ("self-forcing-1.3b", {}, 3),  # block-causal, Self-Forcing's warped sigmas
        ("causvid-1.3b", {}, 2),  # shift 8
        ("longlive-1.3b", {"position": "absolute"}, 5),  # sink 3 + window 6: frames 3.. evicted from chunk 4 on
    ],
)
def test_trace_matches_diffusers_block_causal_forward(preset, overrides, chunks):
    cfg = tiny_cfg(preset, **overrides)
    ref, gen, state, out = rollout(cfg, chunks)
    text = pad_prompt_embeds(state.cond, cfg.text_len)
    assert torch.count_nonzero(text[len(state.cond) :]) == 0 and torch.count_nonzero(text[: len(state.cond)]) > 0
    worst = 0.0
    for c in range(chunks):
        clean = torch.cat(out[:c]) if c else out[0][:0]
        for s, sigma in enumerate(cfg.sigmas):
            key = f"s.{c}.{s}"
            assert float(gen.trace[f"sigma.{key}"]) == pytest.approx(sigma)
            expect = oracle_x0(ref, cfg, clean, gen.trace[f"x_t.{key}"], sigma, text)
            err = rel_err(gen.trace[f"x0.{key}"], expect)
            worst = max(worst, err)
            assert err < TOL, f"chunk {c} step {s}: relative error {err:.2e}"
        assert torch.equal(gen.trace[f"x0.s.{c}.{len(cfg.sigmas) - 1}"], out[c])  # the last step returns x0
    print(f"{preset}: worst relative error over {chunks} chunks x {len(cfg.sigmas)} steps = {worst:.2e}")


def test_self_forcing_sigmas_are_warped_by_shift_5():
    assert tiny_cfg().sigmas == pytest.approx((1.0, 0.9375, 0.833333, 0.625), abs=1e-6)
    assert tiny_cfg("causvid-1.3b").sigmas == pytest.approx((1.0, 0.96, 0.888889, 0.727273), abs=1e-6)


def test_renoise_uses_fresh_noise_between_steps():
    cfg = tiny_cfg()
    _, gen, _, _ = rollout(cfg, 1)
    x0, x_next = gen.trace["x0.s.0.0"], gen.trace["x_t.s.0.1"]
    sigma_next = cfg.sigmas[1]
    eps = (x_next - (1 - sigma_next) * x0) / sigma_next  # the noise the sampler drew
    assert abs(float(eps.std()) - 1) < 0.2 and abs(float(eps.mean())) < 0.2
    first = gen.trace["x_t.s.0.0"]  # the chunk's initial noise: another draw
    assert rel_err(eps, first) > 0.5


def test_chunk_0_equals_bidirectional_forward():
    cfg = tiny_cfg()
    ref, gen, state, _ = rollout(cfg, 1)
    text = pad_prompt_embeds(state.cond, cfg.text_len)
    for block in ref.blocks:
        block.attn1.set_processor(WanAttnProcessor())  # diffusers as shipped: no mask
    x_t = gen.trace["x_t.s.0.0"]
    with torch.no_grad():
        v = ref(x_t.permute(1, 0, 2, 3)[None], torch.tensor([1000.0]), text[None], return_dict=False)[0]
    expect = x_t - v[0].permute(1, 0, 2, 3)
    assert rel_err(gen.trace["x0.s.0.0"], expect) < TOL
