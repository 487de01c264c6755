"""The Wan family's text conditioning: umT5-XXL encoder outputs, trimmed to the prompt's true length.

Follows diffusers' ``WanPipeline._get_t5_prompt_embeds`` (0.42.1) step for step: ``prompt_clean``
(ftfy when it is installed, ``html.unescape`` twice, strip, collapse whitespace with the ``regex``
module), tokenize to ``text_len`` (padding "max_length", truncation, special tokens, attention mask),
``encoder(ids, mask).last_hidden_state``, keep the first ``mask.sum()`` rows. Padding back to
``text_len`` with zero rows is ``pad_prompt_embeds``; the model's text embedder sees those zeros.

``UMT5TextEncoder.from_original`` reads the original Wan2.1 checkpoint
(``models_t5_umt5-xxl-enc-bf16.pth``, Wan's own ``T5Encoder`` key names) into transformers'
``UMT5EncoderModel``; ``original_to_hf_state_dict`` is that key mapping.
"""

from __future__ import annotations

import gc
import html
import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import regex  # diffusers' prompt_clean uses `regex`, whose \s differs from `re`'s (U+001C..U+001F)
import torch

try:  # diffusers applies ftfy.fix_text only when ftfy is installed; so do we
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

TEXT_LEN = 512  # umT5 tokens per prompt in Wan2.1 (max_sequence_length of WanPipeline.__call__)
DEFAULT_CACHE_SIZE = 8  # prompts kept encoded by UMT5TextEncoder


class TextError(ValueError):
    """Bad text-conditioning input (file, folder, prompt); the message is one line."""


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# Prompt cleaning (diffusers pipeline_wan.basic_clean / whitespace_clean / prompt_clean)
# ---------------------------------------------------------------------------------------------


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (if installed), unescape HTML twice, strip, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# Precomputed embeddings (--prompt-embeds FILE.safetensors)
# ---------------------------------------------------------------------------------------------


def load_prompt_embeds(path: str, text_dim: int, text_len: int = TEXT_LEN) -> torch.Tensor:
    """Read unpadded prompt embeddings from a safetensors file.

    Args:
        path: a ``.safetensors`` file holding a tensor ``"prompt_embeds"`` of shape ``[L, text_dim]``
            (or ``[1, L, text_dim]``), floating point, ``1 <= L <= text_len``, all values finite.
        text_dim: the width the model expects (4096 for umT5-XXL).
        text_len: the most tokens a prompt may have.

    Returns:
        float32 ``[L, text_dim]`` on CPU.

    Raises:
        TextError: missing or unreadable file, no ``prompt_embeds`` tensor, wrong rank, width or
            length, a non-float dtype, or non-finite values.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise TextError(f"--prompt-embeds: no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if "prompt_embeds" not in keys:
                raise TextError(f"--prompt-embeds {path}: no tensor 'prompt_embeds' (tensors: {keys[:8]})")
            embeds = f.get_tensor("prompt_embeds")
    except TextError:
        raise
    except Exception as exc:  # safetensors raises its own error types on a corrupt header
        raise TextError(f"--prompt-embeds {path}: not a readable safetensors file ({_one_line(exc)})") from exc
    shape = tuple(embeds.shape)
    if embeds.ndim == 3 and shape[0] == 1:
        embeds = embeds[0]  # (1, L, D) -> (L, D)
    if embeds.ndim != 2:
        raise TextError(f"--prompt-embeds {path}: expected shape [L, {text_dim}] or [1, L, {text_dim}], got {shape}")
    if not embeds.is_floating_point():
        raise TextError(f"--prompt-embeds {path}: expected a floating-point tensor, got {embeds.dtype}")
    length, width = embeds.shape
    if width != text_dim:
        raise TextError(f"--prompt-embeds {path}: width {width} != the model's text_dim {text_dim} (shape {shape})")
    if not 1 <= length <= text_len:
        raise TextError(f"--prompt-embeds {path}: {length} tokens, expected 1..{text_len} (unpadded)")
    embeds = embeds.to(torch.float32).contiguous()
    if not torch.isfinite(embeds).all():
        bad = int((~torch.isfinite(embeds)).sum())
        raise TextError(f"--prompt-embeds {path}: {bad} non-finite values (NaN or inf)")
    return embeds


def pad_prompt_embeds(embeds: torch.Tensor, text_len: int = TEXT_LEN) -> torch.Tensor:
    """``[L, D] -> [text_len, D]``: the rows after ``L`` are zeros (same dtype and device as ``embeds``)."""
    if embeds.ndim != 2:
        raise TextError(f"prompt embeddings must be [L, D], got shape {tuple(embeds.shape)}")
    length, width = embeds.shape
    if not 1 <= length <= text_len:
        raise TextError(f"prompt embeddings have {length} tokens, expected 1..{text_len}")
    return torch.cat([embeds, embeds.new_zeros(text_len - length, width)])  # (L, D) -> (text_len, D)


# ---------------------------------------------------------------------------------------------
# Original Wan2.1 umT5 checkpoint (wan/modules/t5.py T5Encoder) -> transformers UMT5EncoderModel
# ---------------------------------------------------------------------------------------------

# Per block i: Wan `blocks.{i}.<name>` -> HF `encoder.block.{i}.<name>`. Wan's feed-forward computes
# fc1(x) * gelu_tanh(gate.0(x)); HF's gated one wi_1(x) * gelu_new(wi_0(x)). umT5 has shared_pos=False:
# each block carries its own relative-position table (HF: every layer has_relative_attention_bias).
_WAN_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def umt5_xxl_config():
    """transformers ``UMT5Config`` of google/umt5-xxl's encoder (what Wan2.1's ``umt5_xxl`` builds)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,  # 64 heads x 64 = dim_attn 4096
        d_ff=10240,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,  # Wan's T5RelativeEmbedding max_dist
        dropout_rate=0.1,  # inactive in eval mode
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",  # -> is_gated_act, dense_act_fn "gelu_new" (tanh GELU, as Wan's)
    )


def config_of_original(sd: Mapping[str, torch.Tensor]):
    """The ``UMT5Config`` a Wan ``T5Encoder`` state dict was built with, read off its tensor shapes
    (umt5-xxl's for Wan2.1's own file; any size for a smaller one).

    Raises:
        TextError: the tensors that carry the shapes are missing.
    """
    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        inner = sd["blocks.0.attn.q.weight"].shape[0]
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError, AttributeError):
        raise TextError("not a Wan umT5 encoder state dict (no token_embedding / blocks.0 tensors)") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.fullmatch(k)))
    cfg = umt5_xxl_config()
    for name, value in dict(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                            num_decoder_layers=layers, num_heads=heads,
                            relative_attention_num_buckets=buckets).items():  # fmt: skip
        setattr(cfg, name, int(value))
    return cfg


def original_to_hf_state_dict(sd: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Wan ``T5Encoder`` state dict -> ``UMT5EncoderModel`` state dict (same tensors, renamed).

    Raises:
        TextError: a key that is not Wan's, or one that a ``num_layers``-layer encoder needs is missing.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in _WAN_TOP_KEYS:
            out[_WAN_TOP_KEYS[key]] = value
            continue
        m = _BLOCK_RE.fullmatch(key)
        if m is None or m.group(2) not in _WAN_BLOCK_KEYS or int(m.group(1)) >= num_layers:
            unknown.append(key)
            continue
        out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK_KEYS[m.group(2)]}"] = value
    expected = {*_WAN_TOP_KEYS.values()}
    expected |= {f"encoder.block.{i}.{v}" for i in range(num_layers) for v in _WAN_BLOCK_KEYS.values()}
    missing = sorted(expected - out.keys())
    if unknown or missing:
        raise TextError(
            f"not a Wan umT5 encoder state dict for {num_layers} layers: "
            f"{len(unknown)} unexpected keys {unknown[:3]}, {len(missing)} missing {missing[:3]}"
        )
    out["encoder.embed_tokens.weight"] = out["shared.weight"]  # tied in UMT5EncoderModel
    return out


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


class UMT5TextEncoder:
    """umT5 encoder + tokenizer from local folders; encodes each prompt once (LRU cache of a few prompts).

    ``encode(prompt)`` equals diffusers' ``WanPipeline._get_t5_prompt_embeds(prompt,
    max_sequence_length=text_len)[0]`` cut to the prompt's token count, as float32 on CPU.
    """

    def __init__(
        self,
        encoder_dir: str,
        tokenizer_dir: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        text_len: int = TEXT_LEN,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        """Load ``UMT5EncoderModel`` from ``encoder_dir`` and the tokenizer from ``tokenizer_dir`` (local only).

        Raises:
            TextError: a folder is missing or does not load.
        """
        from transformers import UMT5EncoderModel

        tokenizer = _load_tokenizer(tokenizer_dir)
        if not os.path.isdir(encoder_dir):
            raise TextError(f"umT5 text encoder folder not found: {encoder_dir}")
        try:
            model = UMT5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, dtype=dtype)
        except Exception as exc:  # transformers raises OSError / ValueError / EnvironmentError variants
            raise TextError(f"cannot load the umT5 text encoder from {encoder_dir} ({_one_line(exc)})") from exc
        self._setup(model, tokenizer, device, text_len, cache_size)

    @classmethod
    def from_original(
        cls,
        pth_file: str,
        tokenizer_dir: str,
        config=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> UMT5TextEncoder:
        """Load Wan2.1's own ``models_t5_umt5-xxl-enc-bf16.pth`` (or a ``.safetensors`` with the same keys).

        Args:
            config: a ``UMT5Config``; default: read off the checkpoint's shapes (``config_of_original``).
            dtype: the encoder's dtype; default bfloat16, the checkpoint's and Wan's ``t5_dtype``.

        Raises:
            TextError: missing or unreadable file, or keys / shapes that are not the config's.
        """
        from transformers import UMT5EncoderModel

        tokenizer = _load_tokenizer(tokenizer_dir)
        if not os.path.isfile(pth_file):
            raise TextError(f"Wan umT5 checkpoint not found: {pth_file}")
        try:
            if pth_file.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(pth_file, device="cpu")
            else:
                sd = _load_pth(pth_file)
        except Exception as exc:
            raise TextError(f"cannot read the Wan umT5 checkpoint {pth_file} ({_one_line(exc)})") from exc
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise TextError(f"{pth_file}: expected a state dict of tensors, got {type(sd).__name__}")
        config = config if config is not None else config_of_original(sd)
        hf_sd = original_to_hf_state_dict(sd, config.num_layers)
        with torch.device("meta"):  # no 5.7B-parameter random init; the checkpoint's tensors are assigned
            model = UMT5EncoderModel(config)
        try:
            model.load_state_dict(hf_sd, strict=True, assign=True)
        except RuntimeError as exc:  # shape mismatch
            raise TextError(f"{pth_file}: does not fit the umT5 config ({_one_line(exc)})") from exc
        model.encoder.set_input_embeddings(model.shared)  # re-tie after assign (one embedding table)
        model = model.to(dtype=dtype)
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device, text_len, cache_size)
        return self

    def _setup(self, model, tokenizer, device, text_len: int, cache_size: int) -> None:
        if text_len < 1 or cache_size < 0:
            raise TextError(f"{text_len=} must be >= 1 and {cache_size=} >= 0")
        self.device = torch.device(device)
        self.text_len = text_len
        self.dim = int(model.config.d_model)  # width of encode()'s rows (text_dim)
        self._model = model.to(self.device).eval().requires_grad_(False)
        self._tokenizer = tokenizer
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    def encode(self, prompt: str) -> torch.Tensor:
        """float32 ``[L, d_model]`` on CPU, ``1 <= L <= text_len``: the prompt's tokens incl. ``</s>``.

        Raises:
            TextError: ``prompt`` is not a string.
        """
        if not isinstance(prompt, str):
            raise TextError(f"a prompt must be a string, got {type(prompt).__name__}")
        if self._model is None:
            raise RuntimeError("UMT5TextEncoder.encode after close()")
        key = prompt_clean(prompt)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].clone()
        with torch.inference_mode():
            inputs = self._tokenizer(
                [key],
                padding="max_length",
                max_length=self.text_len,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            ids, mask = inputs.input_ids, inputs.attention_mask  # (1, text_len) each
            seq_len = int(mask.gt(0).sum(dim=1).long()[0])
            hidden = self._model(ids.to(self.device), mask.to(self.device)).last_hidden_state  # (1, text_len, D)
            rows = hidden[0, :seq_len].to(device="cpu", dtype=torch.float32)  # (L, D)
        embeds = rows.clone()  # a normal tensor (not an inference tensor): usable where autograd runs
        if self._cache_size:
            self._cache[key] = embeds
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return embeds.clone()
        return embeds

    def close(self) -> None:
        """Free the model and the cache; ``encode`` fails afterwards."""
        on_cuda = self.device.type == "cuda"
        self._model = None
        self._cache.clear()
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def _load_pth(path: str):
    """``torch.load`` with ``weights_only``; memory-mapped (the xxl file is ~11 GB) unless the file predates zip."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise TextError(f"umT5 tokenizer folder not found: {tokenizer_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / EnvironmentError variants
        raise TextError(f"cannot load the umT5 tokenizer from {tokenizer_dir} ({_one_line(exc)})") from exc
    if tokenizer.pad_token_id is None or tokenizer.padding_side != "right":
        # the trim to mask.sum() rows assumes the real tokens come first, as in diffusers
        raise TextError(
            f"umT5 tokenizer in {tokenizer_dir} must pad on the right with a pad token "
            f"(padding_side={tokenizer.padding_side!r}, pad_token={tokenizer.pad_token!r})"
        )
    return tokenizer
