"""Read a Phi decoder's config.json (transformers' `PhiForCausalLM`: Phi-1.5, Phi-2) as a `DecoderConfig`.

The weights need no translating: tinyomni.model.phi uses transformers' names, so hf_llama.load_hf_decoder
reads them as it reads a Llama's. Only the config differs, and what we do not build is refused by name.
"""

from __future__ import annotations

from typing import Any

from tinyomni.config import ACTIVATIONS, DecoderConfig
from tinyomni.errors import CheckpointError


def phi_decoder_config(hf: dict[str, Any]) -> DecoderConfig:
    """A Phi config.json (transformers 4's flat `rope_theta` / `partial_rotary_factor`, or transformers 5's
    `rope_parameters`) → DecoderConfig(kind="phi"), or a CheckpointError naming the unsupported value."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"Phi with rope type {rope_type!r} is not supported (default RoPE only)")
    act = hf.get("hidden_act", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"Phi with hidden_act {act!r} is not supported ({', '.join(sorted(ACTIVATIONS))})")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim not in (None, hf["hidden_size"] // heads):
        # transformers' Phi sizes its q/k LayerNorms by hidden_size // heads whatever head_dim says
        raise CheckpointError(f"Phi with head_dim {head_dim} (not hidden_size // num_attention_heads) is not supported")
    config = DecoderConfig(
        kind="phi",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        partial_rotary_factor=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        qk_layernorm=bool(hf.get("qk_layernorm", False)),
        hidden_act=act,
        attention_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    rotary = config.rotary_dim
    if rotary <= 0 or rotary % 2 or config.partial_rotary_factor > 1:
        raise CheckpointError(f"Phi with partial_rotary_factor {config.partial_rotary_factor} "
                              f"({rotary} rotary channels of {config.attn_head_dim}) is not supported: "
                              "it must give a positive even channel count")
    if heads % config.num_key_value_heads:
        raise CheckpointError(f"Phi with {heads} attention heads over {config.num_key_value_heads} key/value heads "
                              "is not supported (heads must be a multiple)")
    return config
