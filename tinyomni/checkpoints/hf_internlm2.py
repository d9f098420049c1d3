"""Read an InternLM2 decoder (`InternLM2ForCausalLM`, remote code: internlm2-chat-1_8b is the language
model of InternVL2-2B and Mini-InternVL-Chat-2B-V1-5) as our Llama-style decoder.

InternLM2 is a Llama under other names (the table below) with one fused projection, `attention.wqkv`.
Its rows are grouped by key/value head: for each of the num_key_value_heads groups, that group's
num_attention_heads // num_key_value_heads query heads, then its key head, then its value head, each
head_dim rows (the original code reshapes the output as (kv_heads, groups + 2, head_dim)). `split_wqkv`
cuts it into our q/k/v in our head order (query head j reads key/value head j // groups).

Config fields: `bias` (wqkv and wo biases: refused, internlm2-chat checkpoints have none),
`rope_theta`, `rope_scaling` {"type": "linear" | "dynamic", "factor"}, `rope_pos_id_version` (only
"default"; InternVL's V2PE is refused). Dynamic NTK changes nothing below max_position_embeddings, the
longest context tinyomni runs (model/decoder.py).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tinyomni.config import DecoderConfig
from tinyomni.errors import CheckpointError, ConfigError

# Inside the decoder body: InternLM2 → ours ("{i}" is the layer on both sides). wqkv becomes a temporary
# "self_attn.wqkv.weight" that split_wqkv turns into our three projections.
NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
LAYER_NAMES = {
    "layers.{i}.attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wqkv.weight": "layers.{i}.self_attn.wqkv.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.mlp.down_proj.weight",
}
HEAD_NAMES = {"weight": "weight"}  # InternLM2ForCausalLM's `output` is our lm_head


def internlm2_decoder_config(hf: dict[str, Any], where: str = "InternLM2") -> DecoderConfig:
    """An InternLM2 config.json / llm_config → DecoderConfig, or a CheckpointError naming what we cannot run."""
    problems = []
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("bias", True):  # InternLM2Config's default is True
        problems.append("bias true (wqkv / wo biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("rope_pos_id_version", "default") not in (None, "default"):
        problems.append(f"rope_pos_id_version {hf['rope_pos_id_version']!r} (only default)")
    if hidden % heads:
        problems.append(f"hidden_size {hidden} not divisible by num_attention_heads {heads}")
    scaling = None
    rope = hf.get("rope_scaling")
    if rope:
        kind = rope.get("type", rope.get("rope_type"))
        if kind in ("linear", "dynamic"):
            scaling = {"rope_type": kind, "factor": float(rope["factor"])}
        else:
            problems.append(f"rope_scaling type {kind!r} (linear and dynamic only)")
    if problems:
        raise CheckpointError(f"{where}: unsupported InternLM2 config value(s): {'; '.join(problems)}")
    config = DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling, attention_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2), pad_token_id=hf.get("pad_token_id", 0))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the InternLM2 config does not fit tinyomni: {e}") from None
    return config


def split_wqkv(state: dict[str, torch.Tensor], config: DecoderConfig, where: str = "InternLM2") -> None:
    """In place: every `self_attn.wqkv.weight` (any prefix) → our q_proj / k_proj / v_proj weights."""
    kv, d = config.num_key_value_heads, config.attn_head_dim
    groups = config.num_attention_heads // kv
    for key in [k for k in state if k.endswith(".self_attn.wqkv.weight")]:
        fused = state.pop(key)
        if fused.shape[0] != kv * (groups + 2) * d:
            theirs = key.replace(".self_attn.wqkv.", ".attention.wqkv.")
            raise CheckpointError(f"{where}: {theirs} has {fused.shape[0]} rows, the config says "
                                  f"{kv * (groups + 2) * d}")
        grouped = fused.reshape(kv, groups + 2, d, fused.shape[-1])
        stem = key[: -len("wqkv.weight")]
        state[stem + "q_proj.weight"] = grouped[:, :groups].reshape(-1, fused.shape[-1]).contiguous()
        state[stem + "k_proj.weight"] = grouped[:, groups].reshape(-1, fused.shape[-1]).contiguous()
        state[stem + "v_proj.weight"] = grouped[:, groups + 1].reshape(-1, fused.shape[-1]).contiguous()


def their_name(ours: str) -> str | None:
    """The InternLM2 name of one of our decoder-body tensors (body-relative; for error messages)."""
    ours = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.wqkv.", ours)
    for theirs, name in NAMES.items():
        if name == ours:
            return theirs
    match = re.match(r"^layers\.(\d+)\.", ours)
    if match:
        template = f"layers.{{i}}.{ours[match.end():]}"
        for theirs, name in LAYER_NAMES.items():
            if name == template:
                return theirs.format(i=match.group(1))
    return None
