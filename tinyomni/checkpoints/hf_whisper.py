"""Import the encoder of a Hugging Face Whisper checkpoint as our `AudioEncoder`.

Works on a local directory saved by transformers (`config.json` + `*.safetensors`) from
`WhisperForConditionalGeneration` (keys `model.encoder.*`), `WhisperModel` (`encoder.*`) or a bare
`WhisperEncoder`. Only the encoder tensors are read; the decoder is skipped without being loaded.
The name table below is the whole conversion: no tensor is reshaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tinyomni.config import AudioConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.model.audio import AudioEncoder

# transformers name (after "layers.N.") -> ours (after "layers.N.")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.q_proj.bias": "self_attn.q_proj.bias",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",  # Whisper's key projection has no bias
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.v_proj.bias": "self_attn.v_proj.bias",
    "self_attn.out_proj.weight": "self_attn.out_proj.weight",
    "self_attn.out_proj.bias": "self_attn.out_proj.bias",
    "self_attn_layer_norm.weight": "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias": "self_attn_layer_norm.bias",
    "fc1.weight": "fc1.weight",
    "fc1.bias": "fc1.bias",
    "fc2.weight": "fc2.weight",
    "fc2.bias": "fc2.bias",
    "final_layer_norm.weight": "final_layer_norm.weight",
    "final_layer_norm.bias": "final_layer_norm.bias",
}
GLOBAL_NAMES = {
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "embed_positions.weight": "embed_positions.weight",
    "layer_norm.weight": "layer_norm.weight",
    "layer_norm.bias": "layer_norm.bias",
}
# Where the encoder lives in each kind of saved model, tried in this order.
ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")
# Configs of the same encoder: Whisper's, and Qwen2-Audio's audio_config (its tower adds only a
# parameter-free average pool, see checkpoints/qwen2_audio.py).
MODEL_TYPES = ("whisper", "qwen2_audio_encoder")


def whisper_name_map(num_layers: int) -> dict[str, str]:
    """Every encoder tensor name in a transformers Whisper checkpoint (no prefix) -> our name."""
    names = dict(GLOBAL_NAMES)
    for i in range(num_layers):
        names.update({f"layers.{i}.{hf}": f"layers.{i}.{ours}" for hf, ours in LAYER_NAMES.items()})
    return names


def audio_config_from_hf(hf_config: dict[str, Any], pool_stride: int = 1) -> AudioConfig:
    """Our `AudioConfig` from a Whisper `config.json` dict (or Qwen2-Audio's `audio_config`).

    `pool_stride` defaults to 1, which reproduces Whisper's encoder output exactly; an omni model
    that wants fewer audio tokens sets 2 or more.
    """
    model_type = hf_config.get("model_type", "whisper")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"expected a Whisper config (model_type {' or '.join(map(repr, MODEL_TYPES))}), "
                          f"got model_type {model_type!r}")
    required = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                "max_source_positions")
    missing = [key for key in required if key not in hf_config]
    if missing:
        raise ConfigError(f"Whisper config is missing {', '.join(missing)}")
    config = AudioConfig(
        num_mel_bins=int(hf_config["num_mel_bins"]),
        d_model=int(hf_config["d_model"]),
        encoder_layers=int(hf_config["encoder_layers"]),
        encoder_attention_heads=int(hf_config["encoder_attention_heads"]),
        encoder_ffn_dim=int(hf_config["encoder_ffn_dim"]),
        max_source_positions=int(hf_config["max_source_positions"]),
        activation_function=hf_config.get("activation_function", "gelu"),
        layer_norm_eps=1e-5,  # Whisper uses nn.LayerNorm's default; its config does not store it
        pool_stride=pool_stride,
    )
    config.validate()
    return config


def find_encoder_prefix(names: Iterable[str]) -> str:
    """The prefix in front of the encoder's tensors (`model.encoder.`, `encoder.` or none)."""
    names = set(names)
    for prefix in ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in names:
            return prefix
    raise CheckpointError("no Whisper encoder found: expected a tensor named model.encoder.conv1.weight, "
                          "encoder.conv1.weight or conv1.weight")


def convert_hf_whisper_encoder(state_dict: Mapping[str, torch.Tensor],
                               config: AudioConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers Whisper state dict's encoder tensors to ours.

    Tensors outside the encoder (decoder, `proj_out`) are ignored; an encoder tensor we do not know,
    or one we need and do not find, is a CheckpointError that names it.
    """
    prefix = find_encoder_prefix(state_dict)
    names = whisper_name_map(config.encoder_layers)
    ours: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        if prefix == "" and short.startswith(("decoder.", "proj_out.")):
            continue
        if short not in names:
            unknown.append(key)
            continue
        ours[names[short]] = tensor
    if unknown:
        raise CheckpointError(f"unexpected Whisper encoder tensor(s) {_listing(unknown)} "
                              f"(config says {config.encoder_layers} layers)")
    missing = [prefix + hf for hf, name in names.items() if name not in ours]
    if missing:
        raise CheckpointError(f"Whisper checkpoint is missing encoder tensor(s) {_listing(missing)}")
    return ours


def load_hf_whisper_encoder(path: str | Path, pool_stride: int = 1,
                            dtype: torch.dtype = torch.float32) -> AudioEncoder:
    """Build an `AudioEncoder` from a local Hugging Face Whisper directory."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    try:
        config = audio_config_from_hf(hf_config, pool_stride=pool_stride)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None

    state = _read_encoder_tensors(path)
    weights = convert_hf_whisper_encoder(state, config)
    model = AudioEncoder(config)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in weights.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not fit config.json: {_listing(wrong)}")
    model.load_state_dict(weights, strict=True)
    return model.to(dtype).eval()


def _read_encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path} (only safetensors checkpoints are read)")
    handles = []
    try:
        for file in files:
            handles.append(safe_open(str(file), framework="pt"))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    prefix = find_encoder_prefix(name for handle in handles for name in handle.keys())
    state: dict[str, torch.Tensor] = {}
    for handle in handles:
        for name in handle.keys():
            # Read only the encoder: the decoder is most of a Whisper checkpoint.
            if name.startswith(prefix) and not (prefix == "" and name.startswith(("decoder.", "proj_out."))):
                state[name] = handle.get_tensor(name)
    return state


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
