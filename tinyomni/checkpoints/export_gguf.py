"""Export a model's text decoder to a GGUF file that llama.cpp runs: weights under llama.cpp's tensor
names, the metadata its loader needs, and the tokenizer and chat template inside.

The inverse of `checkpoints/gguf.py`: the same name table read the other way, q/k rows permuted back
into llama.cpp's per-head RoPE layout, and the tokenizer written as llama.cpp's byte-level BPE
("gpt2") vocabulary with its merges, token types and pre-tokenizer name. Media tokens a model added
(`<img>`, `<IMG_CONTEXT>`, ...) travel as control tokens with their embedding rows, so the exported
decoder is the same network, whatever reads it. The vision and audio towers are not in this file.

    tinyomni export tinyomni-world --to gguf --out world.gguf [--outtype f16|bf16|f32|q8_0]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tinyomni.checkpoints.gguf import GLOBAL_NAMES, LAYER_NAMES, SUPPORTED_ARCHITECTURES
from tinyomni.errors import InputError
from tinyomni.model import lora

if TYPE_CHECKING:
    from tinyomni.api import Model

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's token types (llama_token_type): normal text, control (only templates write them), and
# user-defined (matched whole in text).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
# llama.cpp's `general.file_type` for a file whose matrices are all one type (llama_ftype).
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def export_gguf(model: Model, path: str | Path, outtype: str = "f16") -> Path:
    """Write `model`'s decoder, tokenizer and chat template to `path` (a .gguf file), atomically."""
    import gguf

    if outtype not in OUT_TYPES:
        raise InputError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUT_TYPES)}")
    config = model.config.decoder
    if config.kind != "llama":
        raise InputError(f"a decoder of kind {config.kind!r} cannot be exported to GGUF yet (Llama / Qwen2 can)")
    if config.visual_expert:
        raise InputError("a decoder with decoder.visual_expert cannot be exported to GGUF: llama.cpp's Llama / "
                         "Qwen2 layers have no visual-expert weights")
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type", "default") not in ("default", "linear"):
        raise InputError(f"rope_scaling {config.rope_scaling} cannot be exported to GGUF yet (linear can)")
    arch = "qwen2" if config.attention_bias else "llama"
    assert arch in SUPPORTED_ARCHITECTURES
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(Path(str(model.name)).name or "tinyomni")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.attn_head_dim)
    if config.attn_head_dim * config.num_attention_heads != config.hidden_size:  # llama.cpp assumes equality
        writer.add_key_length(config.attn_head_dim)  # unless told the head width
        writer.add_value_length(config.attn_head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    _add_tokenizer(writer, model)
    for name, tensor in gguf_tensors(model).items():
        _add_tensor(writer, name, tensor, outtype)
    return write_atomically(writer, tmp, path)


def gguf_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The decoder's float32 weights under llama.cpp's names, q/k in its RoPE row order."""
    config = model.config.decoder
    ours_to_gguf = {v: k for k, v in GLOBAL_NAMES.items()}
    layer_names = {v: k for k, v in LAYER_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    # An adapter still held as LoRA layers (a model mid-training) is merged: the file is what it computes.
    for name, tensor in lora.merged_state_dict(model.model.language_model).items():
        tensor = tensor.detach().float().cpu()
        if name in ours_to_gguf:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            out[ours_to_gguf[name]] = tensor
            continue
        parts = name.split(".", 3)  # model.layers.N.rest
        if parts[:2] != ["model", "layers"] or parts[3] not in layer_names:
            continue  # buffers (rotary tables) are rebuilt by any reader
        rest = layer_names[parts[3]]
        if rest.startswith("attn_q."):
            tensor = permute_qk(tensor, config.num_attention_heads)
        elif rest.startswith("attn_k."):
            tensor = permute_qk(tensor, config.num_key_value_heads)
        out[f"blk.{parts[2]}.{rest}"] = tensor
    return out


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' q/k rows (each head's rotary halves) → llama.cpp's (each head's pairs); the
    inverse of `gguf.unpermute_qk`."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_atomically(writer, tmp: Path, path: Path) -> Path:
    """Write a GGUFWriter's file to `tmp`, then move it to `path`: a reader never sees half a file."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_tensor(writer, name: str, tensor: torch.Tensor, outtype: str) -> None:
    import gguf

    data = tensor.numpy()
    if data.ndim == 1 or outtype == "f32":  # norms and biases stay float32, as llama.cpp's converter keeps them
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            writer.add_tensor(name, data.astype(np.float16))  # rows must be whole blocks of 32
            return
        packed = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)


def _add_tokenizer(writer, model: Model) -> None:
    tokenizer = model.tokenizer
    spec = json.loads(tokenizer.backend.to_str())
    bpe = spec["model"]
    if bpe.get("type") != "BPE":
        raise InputError(f"only byte-level BPE tokenizers export to GGUF, not {bpe.get('type')}")
    size = model.config.decoder.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]  # rows past the vocabulary (padded tables) get fillers
    types = [USER_DEFINED] * size
    for token, i in bpe["vocab"].items():
        if i < size:
            tokens[i], types[i] = token, NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_ids:
        writer.add_eos_token_id(tokenizer.eos_token_ids[0])
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_chat_template(model.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a `tokenizers` pre-tokenizer (the inverse of Tokenizer.from_gguf's table)."""
    from tinyomni.processing.tokenizer import LLAMA3_PATTERN, QWEN2_PATTERN

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds[:1] == ["Digits"] and any(s.get("individual_digits") for s in steps if s.get("type") == "Digits"):
        return "smollm"
    pattern = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if pattern == LLAMA3_PATTERN:
        return "llama-bpe"
    if pattern == QWEN2_PATTERN:
        return "qwen2"
    return "gpt-2"
