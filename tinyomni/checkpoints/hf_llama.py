"""Import a text decoder from a Hugging Face directory (config.json + safetensors + tokenizer): Llama,
Qwen2 and Mistral here; Phi-2, Phi-3 and Aria's MoE through their own files (hf_phi, hf_phi3, aria).

Our decoder uses transformers' parameter names, so Llama-family weights load as they are; only the
config needs translating, and checked. Phi-3's fused projections and Aria's stacked experts are split.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tinyomni.checkpoints.aria import aria_decoder_config, aria_decoder_state
from tinyomni.checkpoints.hf_phi import phi_decoder_config
from tinyomni.checkpoints.hf_phi3 import phi3_decoder_config, split_phi3
from tinyomni.config import DecoderConfig
from tinyomni.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def decoder_config_from_hf(hf: dict) -> DecoderConfig:
    model_type = hf.get("model_type")
    if model_type == "phi":  # same weight names as ours, its own config (checkpoints/hf_phi.py)
        return phi_decoder_config(hf)
    if model_type == "phi3":  # Llama with fused qkv / gate_up, LongRoPE (checkpoints/hf_phi3.py)
        return phi3_decoder_config(hf)
    if model_type == "aria_text":  # the MoE decoder; its experts are split in load_hf_decoder (checkpoints/aria.py)
        return aria_decoder_config(hf)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not a supported decoder ({SUPPORTED_MODEL_TYPES})")
    return llama_decoder_config(hf)


def llama_decoder_config(hf: dict) -> DecoderConfig:
    """The Llama-family fields of a config.json: Llama, Qwen2, Mistral, and the attention side of Aria's."""
    model_type = hf.get("model_type")
    heads = hf["num_attention_heads"]
    # transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    return DecoderConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope or None,
        attention_bias=hf.get("attention_bias", model_type == "qwen2"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards an index file lists."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json) in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight file missing: {file}")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is corrupt or truncated ({e})") from None
    return state


def load_hf_decoder(path: str | Path) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"config.json missing in {path}")
    hf = json.loads(config_file.read_text())
    if "text_config" in hf and hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        hf = hf["text_config"]
    config = decoder_config_from_hf(hf)
    state = read_safetensors_dir(path)
    # Composite checkpoints keep the decoder under a prefix; take just that part.
    for prefix in ("language_model.", "model.language_model."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if config.kind == "moe":  # Aria's stacked experts → one module per expert
        state = aria_decoder_state(state, config)
    if hf.get("model_type") == "phi3":
        split_phi3(state, config, str(path))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, {k: v.float() for k, v in state.items()}
