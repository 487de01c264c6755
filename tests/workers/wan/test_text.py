"""workers/models/wan/text.py against diffusers' WanPipeline._get_t5_prompt_embeds, on tiny local parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.workers.wan.text_fixtures import (
    TINY_D_MODEL,
    hf_to_wan_keys,
    make_tiny_encoder,
    make_tiny_text_parts,
    make_tiny_tokenizer,
    tiny_umt5_config,
)
from workers.models.wan.text import (
    TEXT_LEN,
    TextError,
    UMT5TextEncoder,
    config_of_original,
    load_prompt_embeds,
    original_to_hf_state_dict,
    pad_prompt_embeds,
    prompt_clean,
    umt5_xxl_config,
)

LONG_PROMPT = (
    "A red car drives through the city at night, rain on the street, neon signs reflected in puddles; "
    "the camera follows low behind it while a dog walks on the pavement. 42 lights!"
)
PROMPTS = ["", "A cat walks on the beach at sunset", LONG_PROMPT, "  a &amp;amp; dog\n\t at\u3000night \x1c "]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[str, str]:
    return make_tiny_text_parts(tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="module")
def encoder(parts) -> UMT5TextEncoder:
    enc = UMT5TextEncoder(*parts)
    yield enc
    enc.close()


def _diffusers_embeds(parts, prompts: list[str], max_len: int) -> torch.Tensor:
    """diffusers' own path: a WanPipeline holding the same tokenizer and encoder (loaded independently)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc_dir, tok_dir = parts
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tok_dir, local_files_only=True),
        text_encoder=UMT5EncoderModel.from_pretrained(enc_dir, local_files_only=True, dtype=torch.float32).eval(),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(
            prompt=prompts, max_sequence_length=max_len, device=torch.device("cpu"), dtype=torch.float32
        )


def _count_forwards(enc: UMT5TextEncoder) -> list[int]:
    calls = [0]
    enc._model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- prompt cleaning and encoding vs diffusers -------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "  plain  ", "a &amp;amp; b &lt;3", "tabs\tand\nnewlines\r\n", "x\u3000y\u00a0z\x1cw\x1f", "é ñ 猫"]
)
def test_prompt_clean_matches_diffusers(text):
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_prompt_clean

    assert prompt_clean(text) == diffusers_prompt_clean(text)


def test_encode_equals_diffusers_exactly(parts, encoder):
    ref = _diffusers_embeds(parts, PROMPTS, TEXT_LEN)  # (B, 512, D)
    assert ref.shape == (len(PROMPTS), TEXT_LEN, TINY_D_MODEL)
    for i, prompt in enumerate(PROMPTS):
        emb = encoder.encode(prompt)
        assert emb.dtype == torch.float32 and emb.device.type == "cpu" and emb.shape[1] == TINY_D_MODEL
        assert emb.shape[0] >= 1 and emb.abs().sum(dim=1).gt(0).all()  # every kept row is a real token
        padded = pad_prompt_embeds(emb)
        print(f"{prompt[:24]!r}: L={emb.shape[0]} max|diff|={(padded - ref[i]).abs().max().item():.3g}")
        assert torch.equal(padded, ref[i])
        assert torch.count_nonzero(padded[emb.shape[0] :]) == 0
    assert encoder.encode("").shape[0] == 1  # just </s>
    assert encoder.encode(LONG_PROMPT).shape[0] > 20


def test_truncation_to_text_len(parts):
    enc = UMT5TextEncoder(*parts, text_len=8)
    emb = enc.encode(LONG_PROMPT)
    assert emb.shape == (8, TINY_D_MODEL)
    assert torch.equal(emb, _diffusers_embeds(parts, [LONG_PROMPT], 8)[0])


def test_cache_hits_and_evicts(parts):
    enc = UMT5TextEncoder(*parts, cache_size=2)
    calls = _count_forwards(enc)
    a = enc.encode("a cat")
    b = enc.encode("a cat")
    assert calls[0] == 1 and torch.equal(a, b)
    assert torch.equal(enc.encode("  a   cat "), a) and calls[0] == 1  # same cleaned prompt, same entry
    a.zero_()  # the caller's copy: the cached one is untouched
    assert torch.equal(enc.encode("a cat"), b) and calls[0] == 1
    enc.encode("a dog")
    enc.encode("the car")  # evicts "a cat" (least recently used)
    assert calls[0] == 3
    enc.encode("a cat")
    assert calls[0] == 4


def test_output_is_a_normal_tensor_and_deterministic(parts, encoder):
    emb = encoder.encode("the dog at night")
    assert not emb.is_inference() and not emb.requires_grad
    w = torch.ones(TINY_D_MODEL, requires_grad=True)
    (emb * w).sum().backward()  # usable where autograd runs
    other = UMT5TextEncoder(*parts, cache_size=0)
    assert torch.equal(other.encode("the dog at night"), emb)
    assert torch.equal(other.encode("the dog at night"), emb)


def test_encode_rejects_non_strings_and_closed(parts):
    enc = UMT5TextEncoder(*parts)
    with pytest.raises(TextError, match="string"):
        enc.encode(["a cat"])
    enc.close()
    with pytest.raises(RuntimeError, match="close"):
        enc.encode("a cat")


def test_bf16_encoder_returns_float32(parts):
    enc = UMT5TextEncoder(*parts, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    emb = enc.encode("a cat")
    ref = _diffusers_embeds(parts, ["a cat"], TEXT_LEN)[0, : emb.shape[0]]
    assert emb.dtype == torch.float32
    assert (emb - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 rounding only


# --- folders ------------------------------------------------------------------------------------


def test_missing_and_invalid_folders(parts, tmp_path):
    enc_dir, tok_dir = parts
    with pytest.raises(TextError, match="encoder folder not found"):
        UMT5TextEncoder(str(tmp_path / "nope"), tok_dir)
    with pytest.raises(TextError, match="tokenizer folder not found"):
        UMT5TextEncoder(enc_dir, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextError, match="cannot load the umT5 text encoder"):
        UMT5TextEncoder(str(tmp_path / "empty"), tok_dir)
    with pytest.raises(TextError, match="cannot load the umT5 tokenizer"):
        UMT5TextEncoder(enc_dir, str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(TextError, match="cannot load the umT5 text encoder") as err:
        UMT5TextEncoder(str(bad), tok_dir)
    assert "\n" not in str(err.value)


def test_left_padding_tokenizer_is_refused(parts, tmp_path):
    make_tiny_tokenizer().save_pretrained(tmp_path / "left")
    cfg_path = tmp_path / "left" / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "padding_side": "left"}))
    with pytest.raises(TextError, match="pad on the right"):
        UMT5TextEncoder(parts[0], str(tmp_path / "left"))


# --- precomputed embeddings -----------------------------------------------------------------------


def test_load_prompt_embeds_round_trip(tmp_path):
    x = torch.randn(7, 16)
    save_file({"prompt_embeds": x}, tmp_path / "a.safetensors")
    assert torch.equal(load_prompt_embeds(str(tmp_path / "a.safetensors"), 16), x)
    save_file({"prompt_embeds": x[None].to(torch.bfloat16), "other": torch.zeros(1)}, tmp_path / "b.safetensors")
    y = load_prompt_embeds(str(tmp_path / "b.safetensors"), 16)
    assert y.dtype == torch.float32 and torch.equal(y, x.to(torch.bfloat16).float())
    save_file({"prompt_embeds": torch.randn(TEXT_LEN, 16)}, tmp_path / "c.safetensors")
    padded = pad_prompt_embeds(load_prompt_embeds(str(tmp_path / "c.safetensors"), 16))
    assert padded.shape == (TEXT_LEN, 16)
    p = pad_prompt_embeds(x, text_len=10)
    assert p.shape == (10, 16) and torch.equal(p[:7], x) and torch.count_nonzero(p[7:]) == 0


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"embeds": torch.randn(3, 16)}, "no tensor 'prompt_embeds'"),
        ({"prompt_embeds": torch.randn(16)}, r"expected shape \[L, 16\]"),
        ({"prompt_embeds": torch.randn(2, 3, 16)}, r"expected shape"),
        ({"prompt_embeds": torch.randn(3, 8)}, "width 8 != the model's text_dim 16"),
        ({"prompt_embeds": torch.randn(0, 16)}, "0 tokens, expected 1..512"),
        ({"prompt_embeds": torch.randn(TEXT_LEN + 1, 16)}, "513 tokens"),
        ({"prompt_embeds": torch.tensor([[0.0] * 15 + [math.nan]])}, "1 non-finite"),
        ({"prompt_embeds": torch.full((2, 16), math.inf)}, "32 non-finite"),
        ({"prompt_embeds": torch.ones(3, 16, dtype=torch.int32)}, "floating-point"),
    ],
)
def test_load_prompt_embeds_bad(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(TextError, match=match) as err:
        load_prompt_embeds(str(path), 16)
    print(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_prompt_embeds_unreadable(tmp_path):
    with pytest.raises(TextError, match="no such file"):
        load_prompt_embeds(str(tmp_path / "missing.safetensors"), 16)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(TextError, match="not a readable safetensors file"):
        load_prompt_embeds(str(tmp_path / "junk.safetensors"), 16)


def test_pad_prompt_embeds_bad():
    with pytest.raises(TextError, match=r"\[L, D\]"):
        pad_prompt_embeds(torch.zeros(1, 3, 4))
    with pytest.raises(TextError, match="expected 1..4"):
        pad_prompt_embeds(torch.zeros(5, 4), text_len=4)


# --- the original Wan2.1 checkpoint (wan/modules/t5.py T5Encoder names) ---------------------------


def _wan_reference(sd: dict[str, torch.Tensor], ids, mask, heads: int, buckets: int, max_dist: int = 128):
    """T5 encoder maths over Wan's key names (RMS norms, unscaled attention with a per-layer bidirectional
    bucketed position bias, fc1(x) * gelu_tanh(gate(x))), written for this test in plain torch."""

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    n = ids.shape[1]
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key position - query position
    half = buckets // 2
    exact = half // 2
    far = exact + (torch.log(rel.abs().float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(rel.abs() < exact, rel.abs(), far.clamp(max=half - 1))
    x = sd["token_embedding.weight"][ids]  # (B, N, C)
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = rms(x, w["norm1.weight"])
        q, k, v = (F.linear(h, w[f"attn.{c}.weight"]).unflatten(-1, (heads, -1)) for c in "qkv")  # (B, N, H, D)
        bias = w["pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)  # (N, N, H) -> (H, N, N)
        score = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias
        score = score.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        att = torch.einsum("bhqk,bkhd->bqhd", score.softmax(-1), v).flatten(2)  # (B, N, H*D)
        x = x + F.linear(att, w["attn.o.weight"])
        h = rms(x, w["norm2.weight"])
        gate = F.gelu(F.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, w["ffn.fc1.weight"]) * gate, w["ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


@pytest.fixture(scope="module")
def wan_pth(parts, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    hf = make_tiny_encoder(len(make_tiny_tokenizer()))  # same seed as the saved encoder
    sd = hf_to_wan_keys(hf.state_dict())
    path = tmp_path_factory.mktemp("wan") / "models_t5_umt5-tiny-enc.pth"
    torch.save(sd, path)
    return path, sd


def test_from_original_matches_hf_folder(parts, encoder, wan_pth):
    path, sd = wan_pth
    config = tiny_umt5_config(len(make_tiny_tokenizer()))
    assert set(original_to_hf_state_dict(sd, config.num_layers)) == set(encoder._model.state_dict())
    orig = UMT5TextEncoder.from_original(str(path), parts[1], config=config, dtype=torch.float32)
    assert orig._model.shared.weight is orig._model.encoder.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in orig._model.parameters())
    for prompt in PROMPTS:
        assert torch.equal(orig.encode(prompt), encoder.encode(prompt))


def test_from_original_reads_its_config_off_the_shapes(parts, encoder, wan_pth):
    path, sd = wan_pth
    want = tiny_umt5_config(len(make_tiny_tokenizer()))
    got = config_of_original(sd)
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(got, name) == getattr(want, name), name
    orig = UMT5TextEncoder.from_original(str(path), parts[1], dtype=torch.float32)  # no config given
    assert torch.equal(orig.encode(PROMPTS[1]), encoder.encode(PROMPTS[1]))
    xxl = umt5_xxl_config()
    meta = {"token_embedding.weight": torch.empty(256384, 4096, device="meta"),
            "blocks.0.attn.q.weight": torch.empty(4096, 4096, device="meta"),
            "blocks.0.pos_embedding.embedding.weight": torch.empty(32, 64, device="meta"),
            "blocks.0.ffn.fc1.weight": torch.empty(10240, 4096, device="meta"),
            "blocks.23.norm1.weight": torch.empty(4096, device="meta")}  # fmt: skip
    assert config_of_original(meta).to_dict() == xxl.to_dict()  # Wan2.1's own file: umt5-xxl


def test_from_original_matches_wan_maths(parts, wan_pth):
    path, sd = wan_pth
    config = tiny_umt5_config(len(make_tiny_tokenizer()))
    orig = UMT5TextEncoder.from_original(str(path), parts[1], config=config, dtype=torch.float32, text_len=48)
    tok = make_tiny_tokenizer()
    for prompt in PROMPTS:
        t = tok([prompt_clean(prompt)], padding="max_length", max_length=48, truncation=True, return_tensors="pt")
        length = int(t.attention_mask.sum())
        ref = _wan_reference(sd, t.input_ids, t.attention_mask, config.num_heads, config.relative_attention_num_buckets)
        got = orig.encode(prompt)
        print(f"{prompt[:24]!r}: max|diff| vs Wan maths {(got - ref[0, :length]).abs().max().item():.3g}")
        torch.testing.assert_close(got, ref[0, :length], atol=1e-5, rtol=1e-5)


def test_from_original_bad_files(parts, wan_pth, tmp_path):
    path, sd = wan_pth
    config = tiny_umt5_config(len(make_tiny_tokenizer()))
    with pytest.raises(TextError, match="not found"):
        UMT5TextEncoder.from_original(str(tmp_path / "none.pth"), parts[1], config=config)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "blocks.1.ffn.fc1.weight"}, "1 missing"),
        "extra": ({**sd, "blocks.0.attn.bias": torch.zeros(16)}, "1 unexpected"),
        "shape": ({**sd, "norm.weight": torch.ones(8)}, "does not fit"),
    }
    for name, (bad, match) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(TextError, match=match):
            UMT5TextEncoder.from_original(str(tmp_path / f"{name}.pth"), parts[1], config=config)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(TextError, match="cannot read"):
        UMT5TextEncoder.from_original(str(tmp_path / "junk.pth"), parts[1], config=config)
