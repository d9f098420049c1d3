"""Read a Phi-3 decoder (`Phi3ForCausalLM`: Phi-3-mini-4k / -128k, the language model of InternVL2-4B and
Mini-InternVL-Chat-4B-V1-5) as our Llama-style decoder.

Phi-3 is a Llama with two fused projections: `self_attn.qkv_proj` (rows: the query heads, then the key
heads, then the value heads) and `mlp.gate_up_proj` (rows: gate, then up). `split_phi3` cuts them into
our q/k/v and gate/up at load; every other name is already ours. Its 128k variants use LongRoPE
(`rope_scaling` type "longrope", "su" in older configs): per-channel short and long factors, switched at
`original_max_position_embeddings`, with cos/sin scaled by an attention factor (model/decoder.py
RotaryEmbedding). What our decoder does not compute is refused by name.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from tinyomni.config import DecoderConfig
from tinyomni.errors import CheckpointError, ConfigError

# Inside the decoder body: Phi-3 → ours before split_phi3 ("{i}" is the layer on both sides).
NAMES = {name: name for name in ("embed_tokens.weight", "norm.weight")}
LAYER_NAMES = {f"layers.{{i}}.{name}": f"layers.{{i}}.{name}" for name in (
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight")}
PHI3_DEFAULT_ORIGINAL_MAX = 4096  # Phi3Config's default original_max_position_embeddings
_FUSED = re.compile(r"(^|\.)layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight$")


def phi3_decoder_config(hf: dict[str, Any], where: str = "Phi-3") -> DecoderConfig:
    """A Phi-3 config (transformers 4's `rope_scaling` + flat `rope_theta`, or transformers 5's
    `rope_parameters`) → DecoderConfig, or a CheckpointError naming each value we cannot run."""
    problems = []
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu)")
    head_dim = hf.get("head_dim")
    if head_dim not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim {head_dim} with hidden_size {hidden} over {heads} heads (only hidden_size // heads)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor {partial} (only 1.0: RoPE over every channel)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    max_positions = int(hf.get("max_position_embeddings", 4096))
    scaling: dict[str, Any] | None = None
    if kind in ("longrope", "su"):  # "su" is the name older Phi-3 configs (and InternVL's copy) use
        original = int(hf.get("original_max_position_embeddings")
                       or rope.get("original_max_position_embeddings") or PHI3_DEFAULT_ORIGINAL_MAX)
        rotary_half = (hidden // heads) // 2
        for name in ("short_factor", "long_factor"):
            values = rope.get(name)
            if not (isinstance(values, list) and len(values) == rotary_half):
                problems.append(f"rope_scaling {name} must be a list of {rotary_half} numbers")
        # As transformers and Phi-3's own code: the attention factor from the context extension, unless given.
        factor = float(rope.get("factor") or max_positions / original)
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = {"rope_type": "longrope", "short_factor": [float(v) for v in rope.get("short_factor") or []],
                   "long_factor": [float(v) for v in rope.get("long_factor") or []],
                   "original_max_position_embeddings": original, "attention_factor": float(attention)}
    elif kind != "default":
        problems.append(f"rope_scaling type {kind!r} (default and longrope/su only)")
    window = hf.get("sliding_window")
    if problems:
        raise CheckpointError(f"{where}: unsupported Phi-3 config value(s): {'; '.join(problems)}")
    # A sliding window never takes effect on a sequence no longer than it (a key is masked only when it
    # is `sliding_window` or more positions back), so the context stops there and stays exact.
    context = min(max_positions, int(window)) if window else max_positions
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    config = DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, max_position_embeddings=context,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
        attention_bias=False, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1), eos_token_id=hf.get("eos_token_id", 32000),
        pad_token_id=hf.get("pad_token_id", 32000))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the Phi-3 config does not fit tinyomni: {e}") from None
    return config


def split_phi3(state: dict[str, torch.Tensor], config: DecoderConfig, where: str = "Phi-3") -> None:
    """In place: each layer's fused `qkv_proj` / `gate_up_proj` (any prefix) → our q/k/v and gate/up."""
    q_rows = config.num_attention_heads * config.attn_head_dim
    kv_rows = config.num_key_value_heads * config.attn_head_dim
    for key in [k for k in state if _FUSED.search(k)]:
        fused = state.pop(key)
        if key.endswith("qkv_proj.weight"):
            sizes, names = (q_rows, kv_rows, kv_rows), ("q_proj", "k_proj", "v_proj")
            stem = key[: -len("qkv_proj.weight")]
        else:
            sizes, names = (config.intermediate_size,) * 2, ("gate_proj", "up_proj")
            stem = key[: -len("gate_up_proj.weight")]
        if fused.shape[0] != sum(sizes):
            raise CheckpointError(f"{where}: {key} has {fused.shape[0]} rows, the config says {sum(sizes)}")
        for name, part in zip(names, fused.split(sizes, dim=0)):
            state[f"{stem}{name}.weight"] = part.contiguous()


def fused_name(ours: str) -> str:
    """The Phi-3 name of one of our split tensors (for error messages)."""
    ours = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.qkv_proj.", ours)
    return re.sub(r"mlp\.(gate|up)_proj\.", "mlp.gate_up_proj.", ours)
