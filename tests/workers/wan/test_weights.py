"""Wan-family weights in every accepted layout load to exactly the diffusers model's tensors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from tests.workers.wan.conftest import random_wan, tiny_wan_config, training_checkpoint
from workers.models.wan import weights as W
from workers.models.wan.keys import diffusers_to_original, original_to_diffusers, strip_wrappers
from workers.models.wan.weights import (
    WeightsError,
    check_keys,
    check_source,
    load_state_dict,
    merge_lora,
    resolve_source,
    weights_digest,
)

# LongLive's LoRA targets: every Linear of each attention block, in original names -> diffusers names
LORA_TARGETS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip


def assert_same(sd: dict, ref: dict) -> None:
    assert sorted(sd) == sorted(ref), (sorted(sd.keys() - ref.keys())[:4], sorted(ref.keys() - sd.keys())[:4])
    for k, v in ref.items():
        assert sd[k].shape == v.shape and torch.equal(sd[k], v), k
    fresh = WanTransformer3DModel(**tiny_wan_config())
    fresh.load_state_dict(sd, strict=True)  # raises on any missing / unexpected key or shape


def longlive_lora(rank: int, seed: int = 5, layers: int = 2) -> dict[str, torch.Tensor]:
    """A peft state dict as LongLive's gather_lora_state_dict saves it (A [r, in], B [out, r])."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"ffn.0": (32, 24), "ffn.2": (24, 32)}
    out = {}
    for i in range(layers):
        for name in LORA_TARGETS:
            o, n = shapes.get(name, (24, 24))
            out[f"base_model.model.blocks.{i}.{name}.lora_A.weight"] = torch.randn(rank, n, generator=gen)
            out[f"base_model.model.blocks.{i}.{name}.lora_B.weight"] = torch.randn(o, rank, generator=gen)
    return out


def expected_merge(ref: dict, lora: dict, scale: float) -> dict:
    """W + scale * B @ A computed here, with the target names mapped by hand (not by weights.py)."""
    out = dict(ref)
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model.") : -len(".lora_A.weight")]  # blocks.{i}.{name}
        _, i, name = module.split(".", 2)
        target = f"blocks.{i}.{LORA_TARGETS[name]}.weight"
        b = lora[key.replace("lora_A", "lora_B")]
        out[target] = ref[target] + scale * (b.double() @ a.double()).float()
    return out


# ---- names ---------------------------------------------------------------------------------------
def test_key_mapping_matches_diffusers_and_round_trips(wan_files):
    orig = diffusers_to_original(wan_files.sd)
    assert len(orig) == 69
    for k in ("head.modulation", "head.head.weight", "blocks.1.modulation", "blocks.0.self_attn.q.weight",
              "blocks.0.cross_attn.o.bias", "blocks.0.norm3.weight", "blocks.1.ffn.2.weight",
              "time_projection.1.weight", "text_embedding.2.bias", "time_embedding.0.weight"):  # fmt: skip
        assert k in orig, k
    assert not any("norm2" in k for k in orig)  # diffusers' norm2 is the original norm3
    assert original_to_diffusers(orig).keys() == wan_files.sd.keys()
    ours = original_to_diffusers(orig)
    theirs = convert_wan_transformer_to_diffusers(dict(orig))
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)


def test_wrappers_are_stripped():
    assert strip_wrappers("model._fsdp_wrapped_module.blocks.3._fsdp_wrapped_module.self_attn.q.weight") == (
        "blocks.3.self_attn.q.weight"
    )
    assert strip_wrappers("base_model.model.blocks.0.ffn.0.lora_A.weight") == "blocks.0.ffn.0.lora_A.weight"
    assert strip_wrappers("model.diffusion_model.head.head.bias") == "head.head.bias"


# ---- every layout -> the same tensors ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["diffusers", "sharded"])
def test_diffusers_transformer_folder(wan_files, layout):
    src = resolve_source(str(getattr(wan_files, layout)))
    assert src.kind == "diffusers-transformer"
    assert (len(src.transformer_files) > 1) == (layout == "sharded")
    assert src.config["num_attention_heads"] == 2 and src.config["ffn_dim"] == 32
    assert_same(load_state_dict(src), wan_files.sd)


def test_pipeline_folder(wan_files):
    src = resolve_source(str(wan_files.pipeline))
    root = wan_files.pipeline
    assert src.kind == "diffusers-pipeline"
    assert (src.text_encoder_dir, src.tokenizer_dir, src.vae) == tuple(
        str(root / p) for p in ("text_encoder", "tokenizer", "vae")
    )
    assert src.original_text_encoder is None
    assert_same(load_state_dict(src), wan_files.sd)
    # its transformer/ given directly still finds the encoder beside it
    t = resolve_source(str(root / "transformer"))
    assert t.kind == "diffusers-transformer" and t.text_encoder_dir == src.text_encoder_dir


def test_original_wan_folder(wan_files):
    src = resolve_source(str(wan_files.original))
    root = wan_files.original
    assert src.kind == "wan-original"
    want = {k: v for k, v in tiny_wan_config().items() if k != "rope_max_seq_len"}
    assert {k: src.config[k] for k in want} == want
    assert src.config["cross_attn_norm"] is True and src.config["qk_norm"] == "rms_norm_across_heads"
    assert src.tokenizer_dir == str(root / "google" / "umt5-xxl") and src.text_encoder_dir is None
    assert src.original_text_encoder == str(root / "models_t5_umt5-xxl-enc-bf16.pth")
    assert src.vae == str(root / "Wan2.1_VAE.pth")
    assert_same(load_state_dict(src), wan_files.sd)


def test_original_config_text_dim_defaults_to_umt5_xxl(wan_files, tmp_path):
    root = tmp_path / "wan"
    shutil.copytree(wan_files.original, root)
    cfg = json.loads((root / "config.json").read_text())
    del cfg["text_dim"]
    (root / "config.json").write_text(json.dumps(cfg))
    assert resolve_source(str(root)).config["text_dim"] == 4096


def test_self_forcing_pt_reads_generator_ema_and_ignores_the_critic(wan_files):
    src = resolve_source(str(wan_files.self_forcing), base=str(wan_files.original))
    assert src.kind == "pt" and src.config["num_layers"] == 2
    assert src.tokenizer_dir is not None and src.vae is not None  # the base folder's parts
    assert_same(load_state_dict(src, ema=True), wan_files.sd)
    assert_same(load_state_dict(src, ema=False), wan_files.self_forcing_generator_sd)
    check_source(src, ema=True)
    assert weights_digest(src, ema=True) != weights_digest(src, ema=False)


@pytest.mark.parametrize("name", ["causvid", "flat_pt", "flat_safetensors"])
def test_causvid_and_flat_files(wan_files, name):
    src = resolve_source(str(getattr(wan_files, name)), base=str(wan_files.diffusers))
    assert src.config["attention_head_dim"] == 12
    assert_same(load_state_dict(src), wan_files.sd)
    bare = resolve_source(str(getattr(wan_files, name)))  # no --base: no config
    assert bare.config is None and bare.tokenizer_dir is None
    assert_same(load_state_dict(bare), wan_files.sd)
    check_source(bare)  # keys checked against the shapes the tensors imply


def test_longlive_fsdp_checkpoint_with_lora(wan_files, tmp_path):
    base = random_wan(3)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    torch.save({"generator": training_checkpoint(base, fsdp=True)}, tmp_path / "longlive_base.pt")
    lora = longlive_lora(rank=4)
    torch.save({"generator_lora": lora, "critic_lora": {"x.lora_A.weight": torch.ones(1)}}, tmp_path / "lora.pt")
    assert any("_fsdp_wrapped_module." in k for k in training_checkpoint(base, fsdp=True))
    src = resolve_source(
        str(tmp_path / "longlive_base.pt"), base=str(wan_files.original), lora=str(tmp_path / "lora.pt")
    )
    plain = resolve_source(str(tmp_path / "longlive_base.pt"), base=str(wan_files.original))
    assert_same(load_state_dict(plain), ref)
    merged = load_state_dict(src)
    want = expected_merge(ref, lora, scale=1.0)  # alpha not recorded: alpha = r
    assert sum(not torch.equal(merged[k], ref[k]) for k in ref) == 2 * len(LORA_TARGETS)
    assert sorted(merged) == sorted(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-5)
    WanTransformer3DModel(**tiny_wan_config()).load_state_dict(merged, strict=True)
    check_source(src)
    assert weights_digest(src) != weights_digest(plain)


def test_merge_lora_alpha_and_dtype(wan_files):
    lora = longlive_lora(rank=3)
    before = {k: v.clone() for k, v in wan_files.sd.items()}
    merged = merge_lora(wan_files.sd, lora, alpha=6.0)  # scale alpha / r = 2
    for k, v in expected_merge(wan_files.sd, lora, scale=2.0).items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(wan_files.sd[k], v) for k, v in before.items())  # the input is not modified
    bf16 = {k: v.bfloat16() for k, v in wan_files.sd.items()}
    out = merge_lora(bf16, lora)
    k = "blocks.1.ffn.net.2.weight"
    assert out[k].dtype == torch.bfloat16
    want = (bf16[k].float() + expected_merge({k: torch.zeros(24, 32)}, {
        "base_model.model.blocks.1.ffn.2.lora_A.weight": lora["base_model.model.blocks.1.ffn.2.lora_A.weight"],
        "base_model.model.blocks.1.ffn.2.lora_B.weight": lora["base_model.model.blocks.1.ffn.2.lora_B.weight"],
    }, 1.0)[k]).bfloat16()  # fmt: skip
    assert torch.equal(out[k], want)  # the sum is formed in fp32, then cast once


def test_lora_with_diffusers_names_and_alpha_tensor(wan_files):
    a, b = torch.randn(2, 24), torch.randn(24, 2)
    lora = {"blocks.0.attn2.to_v.lora_A.default.weight": a, "blocks.0.attn2.to_v.lora_B.default.weight": b,
            "blocks.0.attn2.to_v.alpha": torch.tensor(1.0)}  # fmt: skip
    merged = merge_lora(wan_files.sd, lora)
    k = "blocks.0.attn2.to_v.weight"
    torch.testing.assert_close(merged[k], wan_files.sd[k] + 0.5 * b @ a)


def test_hf_cache_entry_resolves_to_refs_main(wan_files, tmp_path):
    entry = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers"
    shutil.copytree(wan_files.pipeline, entry / "snapshots" / "aaa")
    (entry / "snapshots" / "bbb").mkdir()  # a newer, unrelated snapshot
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("aaa\n")
    src = resolve_source(str(entry))
    assert src.kind == "diffusers-pipeline" and src.weights == str(entry)
    assert src.text_encoder_dir == str(entry / "snapshots" / "aaa" / "text_encoder")
    assert_same(load_state_dict(src), wan_files.sd)
    (entry / "refs" / "main").unlink()  # without refs: the newest snapshot
    os.utime(entry / "snapshots" / "aaa", (1, 1))
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_source(str(entry))


def test_repo_id_resolves_from_the_hf_cache_offline(wan_files, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read when called
    monkeypatch.chdir(tmp_path)  # so "Wan-AI/..." is no relative path here
    entry = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers"
    shutil.copytree(wan_files.pipeline, entry / "snapshots" / "c0ffee")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("c0ffee")
    src = resolve_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert src.kind == "diffusers-pipeline" and src.text_encoder_dir.endswith("c0ffee/text_encoder")
    assert_same(load_state_dict(src), wan_files.sd)
    with pytest.raises(WeightsError, match="hf download Wan-AI/Other"):
        resolve_source("Wan-AI/Other")


def test_converted_safetensors_carries_its_config(wan_files, tmp_path):
    path = tmp_path / "converted.safetensors"
    save_file(wan_files.sd, str(path), metadata={"config": json.dumps(wan_files.config)})
    src = resolve_source(str(path))
    assert src.config["num_attention_heads"] == 2 and "metadata" in src.config_from
    assert_same(load_state_dict(src), wan_files.sd)


def test_digest_is_stable_and_content_addressed(wan_files, tmp_path, monkeypatch):
    a = resolve_source(str(wan_files.diffusers))
    shutil.copytree(wan_files.diffusers, tmp_path / "copy")
    d = weights_digest(a)
    assert len(d) == 16 and int(d, 16) >= 0
    assert weights_digest(resolve_source(str(tmp_path / "copy"))) == d  # another path, same bytes
    assert weights_digest(resolve_source(str(wan_files.pipeline))) == d  # same transformer, same config
    changed = {**wan_files.sd, "proj_out.bias": wan_files.sd["proj_out.bias"] + 1}
    save_file(changed, str(tmp_path / "copy" / "diffusion_pytorch_model.safetensors"))
    assert weights_digest(resolve_source(str(tmp_path / "copy"))) != d
    monkeypatch.setattr(W, "FULL_HASH_BYTES", 1024)  # large-file rule: name, size, first + last bytes
    monkeypatch.setattr(W, "EDGE_HASH_BYTES", 16)
    f = tmp_path / "big.pt"
    f.write_bytes(bytes(4096))
    one = W._file_digest(f)
    f.write_bytes(bytes(2000) + b"x" + bytes(2095))
    assert W._file_digest(f) == one  # the middle is not read
    f.write_bytes(bytes(4095) + b"x")
    assert W._file_digest(f) != one


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_paths(wan_files, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a diffusers transformer or pipeline folder nor an original"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(WeightsError, match="FluxTransformer2DModel config, not a WanTransformer3DModel"):
        resolve_source(str(tmp_path / "flux"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(WeightsError, match="not a folder, .pt or .safetensors"):
        resolve_source(str(tmp_path / "w.txt"))
    with pytest.raises(WeightsError, match="LoRA file .* does not exist"):
        resolve_source(str(wan_files.causvid), lora=str(tmp_path / "lora.pt"))
    with pytest.raises(WeightsError, match="--base is for a bare"):
        resolve_source(str(wan_files.diffusers), base=str(wan_files.original))
    with pytest.raises(WeightsError, match="--base .* is not a folder"):
        resolve_source(str(wan_files.causvid), base=str(wan_files.flat_pt))
    shutil.copytree(wan_files.diffusers, tmp_path / "nofiles")
    (tmp_path / "nofiles" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model"):
        resolve_source(str(tmp_path / "nofiles"))


def test_unreadable_pt_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot be read as a weights-only torch checkpoint"):
        load_state_dict(resolve_source(str(tmp_path / "junk.pt")))
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(WeightsError, match="holds a Tensor, not a dict"):
        load_state_dict(resolve_source(str(tmp_path / "tensor.pt")))
    torch.save({"critic": {"w": torch.ones(1)}}, tmp_path / "critic.pt")
    with pytest.raises(WeightsError, match="not a generator state dict"):
        load_state_dict(resolve_source(str(tmp_path / "critic.pt")))
    torch.save({"generator_ema": {"w": torch.ones(1)}}, tmp_path / "ema_only.pt")
    with pytest.raises(WeightsError, match="only generator_ema"):
        load_state_dict(resolve_source(str(tmp_path / "ema_only.pt")), ema=False)


def test_foreign_state_dict_is_refused(wan_files, tmp_path):
    foreign = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).state_dict()
    torch.save({"generator": {f"model.{k}": v for k, v in foreign.items()}}, tmp_path / "other.pt")
    src = resolve_source(str(tmp_path / "other.pt"), base=str(wan_files.diffusers))
    sd = load_state_dict(src)
    with pytest.raises(WeightsError, match=r"69 missing and 4 unexpected tensors .*unexpected: 0.bias, 0.weight"):
        check_keys(sd, src.config)
    with pytest.raises(WeightsError, match="69 missing and 4 unexpected"):
        check_source(src)
    with pytest.raises(WeightsError, match="not Wan transformer weights: no patch_embedding.weight"):
        check_source(resolve_source(str(tmp_path / "other.pt")))  # no config: the shapes cannot even be inferred


def test_missing_and_mismatched_tensors(wan_files):
    partial = {k: v for k, v in wan_files.sd.items() if k != "blocks.1.attn2.norm_k.weight"}
    with pytest.raises(WeightsError, match=r"1 missing and 0 unexpected .*missing: blocks.1.attn2.norm_k.weight"):
        check_keys(partial, wan_files.config)
    with pytest.raises(WeightsError, match=r"blocks.0.ffn.net.0.proj.weight \(32, 24\) \(config: \(64, 24\)\)"):
        check_keys(wan_files.sd, tiny_wan_config(ffn_dim=64))
    check_keys(wan_files.sd, random_wan(0).config)  # a model's FrozenDict config, extra keys and all


def test_mixed_names_are_refused(wan_files, tmp_path):
    mixed = {**wan_files.sd, "blocks.0.self_attn.q.weight": torch.ones(24, 24)}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(WeightsError, match="mixes original Wan and diffusers"):
        load_state_dict(resolve_source(str(tmp_path / "mixed.safetensors")))


def test_bad_loras(wan_files, tmp_path):
    sd = wan_files.sd
    lora = longlive_lora(rank=2, layers=3)  # block 2 does not exist in a 2-layer model
    with pytest.raises(WeightsError, match=r"LoRA targets 10 of its 30 modules that the weights lack: blocks.2."):
        merge_lora(sd, lora)
    one = {"blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 24)}
    with pytest.raises(WeightsError, match="without both lora_A and lora_B"):
        merge_lora(sd, one)
    wrong = {**one, "blocks.0.self_attn.q.lora_B.weight": torch.ones(24, 3)}
    with pytest.raises(WeightsError, match=r"LoRA blocks.0.attn1.to_q: A \(2, 24\) and B \(24, 3\) do not fit"):
        merge_lora(sd, wrong)
    with pytest.raises(WeightsError, match="not a LoRA state dict: unexpected tensor blocks.0.self_attn.q.weight"):
        merge_lora(sd, {"blocks.0.self_attn.q.weight": torch.ones(24, 24)})
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    src = resolve_source(str(wan_files.causvid), lora=str(tmp_path / "lora.pt"))
    with pytest.raises(WeightsError, match="LoRA targets 10"):
        check_source(src)
    torch.save(torch.ones(2), tmp_path / "notlora.pt")
    with pytest.raises(WeightsError, match="neither a peft state dict nor"):
        load_state_dict(resolve_source(str(wan_files.causvid), lora=str(tmp_path / "notlora.pt")))
