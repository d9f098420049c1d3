"""Which importer reads a Hugging Face directory: one explicit table from config.json's `architectures`.

A transformers checkpoint says what it is in `config.json` (`"architectures": ["Qwen2ForCausalLM"]`);
`ARCHITECTURES` maps that exact name to its family. Nothing is guessed from a path or a substring: an
architecture not in the table is a CheckpointError naming it and listing the supported ones, never
a partial load (a VLM read as its text decoder alone, with random encoders, answers garbage).

Two kinds of family:
- a text decoder (Llama, Qwen2, Mistral): `read` is None, and the caller builds an omni model around
  it (`tinyomni.api.from_base_decoder`, fresh encoders);
- a whole multimodal model (InternVL): `read(directory)` returns an `Imported` checkpoint, everything
  in our names, ready to load into an `OmniModel`.
(And a dual encoder, CLIP / SigLIP: not a chat model, so `read` refuses it by name and `embed(directory)`
reads it for tinyomni.retrieval.)

Adding a family is one file in this package and one line here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyomni.config import OmniConfig
from tinyomni.errors import CheckpointError
from tinyomni.processing.tokenizer import Tokenizer


@dataclass
class Imported:
    """A foreign checkpoint in our terms: config, weights under our names, tokenizer and chat template.

    `state` holds every tensor of the model except `language_model.lm_head.weight` when the decoder's
    embeddings are tied.
    """

    config: OmniConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None


@dataclass(frozen=True)
class Family:
    """One importer: its name and how it reads a directory (None: a text decoder, see module doc)."""

    name: str
    read: Callable[[Path], Imported] | None = None
    # A dual encoder (CLIP / SigLIP): it embeds, it does not chat. `read` then refuses by name, and
    # `embed(directory)` reads it for tinyomni.retrieval.
    embed: Callable[[Path], Any] | None = None


def _read_internvl_hf(path: Path) -> Imported:
    from tinyomni.checkpoints import internvl

    return internvl.read_internvl_hf(path)


def _read_internvl_chat(path: Path) -> Imported:
    from tinyomni.checkpoints import internvl

    return internvl.read_internvl_chat(path)


def _read_llava(path: Path) -> Imported:
    from tinyomni.checkpoints import llava

    return llava.read_llava(path)


def _read_llava_next(path: Path) -> Imported:
    from tinyomni.checkpoints import llava_next

    return llava_next.read_llava_next(path)


def _read_smolvlm(path: Path) -> Imported:
    from tinyomni.checkpoints import smolvlm

    return smolvlm.read_smolvlm(path)


def _read_idefics3(path: Path) -> Imported:
    from tinyomni.checkpoints import smolvlm

    return smolvlm.read_idefics3(path)


def _read_qwen2_audio(path: Path) -> Imported:
    from tinyomni.checkpoints import qwen2_audio

    return qwen2_audio.read_qwen2_audio(path)


def _read_blip2(path: Path) -> Imported:
    from tinyomni.checkpoints import blip2

    return blip2.read_blip2(path)


def _read_instructblip(path: Path) -> Imported:
    from tinyomni.checkpoints import instructblip

    return instructblip.read_instructblip(path)


def _read_idefics2(path: Path) -> Imported:
    from tinyomni.checkpoints import idefics2

    return idefics2.read_idefics2(path)


def _read_aria(path: Path) -> Imported:
    from tinyomni.checkpoints import aria

    return aria.read_aria(path)


def _read_dual_encoder(path: Path) -> Any:
    from tinyomni.checkpoints import clip

    return clip.read_dual_encoder(path)


def _not_a_chat_model(path: Path) -> Imported:
    raise CheckpointError(f"{path} is a dual encoder (CLIP / SigLIP): it embeds images and texts, it does not chat; "
                          "use tinyomni.retrieval.load(path) or `tinyomni embed --model PATH`")


DECODER = Family("decoder")
INTERNVL_HF = Family("internvl", _read_internvl_hf)
INTERNVL_CHAT = Family("internvl-original", _read_internvl_chat)
LLAVA = Family("llava", _read_llava)
LLAVA_NEXT = Family("llava-next", _read_llava_next)
SMOLVLM = Family("smolvlm", _read_smolvlm)
IDEFICS3 = Family("idefics3", _read_idefics3)
QWEN2_AUDIO = Family("qwen2-audio", _read_qwen2_audio)
IDEFICS2 = Family("idefics2", _read_idefics2)
INSTRUCTBLIP = Family("instructblip", _read_instructblip)
BLIP2 = Family("blip-2", _read_blip2)
CLIP = Family("clip", _not_a_chat_model, _read_dual_encoder)
SIGLIP = Family("siglip", _not_a_chat_model, _read_dual_encoder)
ARIA = Family("aria", _read_aria)

# config.json "architectures" entry → family. Exact names only.
ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": DECODER,
    "Qwen2ForCausalLM": DECODER,
    "MistralForCausalLM": DECODER,
    "PhiForCausalLM": DECODER,  # Phi-1.5 / Phi-2 (TinyGPT-V's decoder; checkpoints/hf_phi.py)
    "Phi3ForCausalLM": DECODER,  # Phi-3-mini (fused qkv / gate_up, LongRoPE; checkpoints/hf_phi3.py)
    "AriaTextForCausalLM": DECODER,  # Aria's MoE text decoder (checkpoints/aria.py, model/moe.py)
    "AriaForConditionalGeneration": ARIA,  # Aria (Idefics3 SigLIP + cross-attention projector + MoE decoder)
    "InternVLForConditionalGeneration": INTERNVL_HF,  # the transformers-native "-hf" InternVL2.5 / InternVL3
    "InternVLChatModel": INTERNVL_CHAT,  # OpenGVLab's original layout (trust_remote_code)
    "LlavaForConditionalGeneration": LLAVA,  # LLaVA-1.5 "-hf", TinyLLaVA "-hf" (CLIP/SigLIP + Llama/Qwen2)
    "LlavaNextForConditionalGeneration": LLAVA_NEXT,  # LLaVA-NeXT / v1.6 "-hf" (CLIP + Mistral/Vicuna/Llama 3)
    "SmolVLMForConditionalGeneration": SMOLVLM,  # SmolVLM / SmolVLM2 (SigLIP + SmolLM2), image input
    "Idefics3ForConditionalGeneration": IDEFICS3,  # Idefics3-8B-Llama3 (SigLIP + Llama 3)
    "Qwen2AudioForConditionalGeneration": QWEN2_AUDIO,  # Qwen2-Audio-7B(-Instruct) (Whisper + Qwen2)
    "InstructBlipForConditionalGeneration": INSTRUCTBLIP,  # InstructBLIP-Vicuna (BLIP ViT + Q-Former + Llama)
    "Blip2ForConditionalGeneration": BLIP2,  # BLIP-2 OPT (BLIP ViT + queries-only Q-Former + OPT)
    "Idefics2ForConditionalGeneration": IDEFICS2,  # Idefics2-8B (SigLIP + perceiver resampler + Mistral)
    "CLIPModel": CLIP,  # dual encoder for retrieval (checkpoints/clip.py; tinyomni.retrieval)
    "SiglipModel": SIGLIP,  # dual encoder for retrieval (a tokenizer.json needed: see checkpoints/clip.py)
}
# Only for a config.json without "architectures" (hand-written or very old): its model_type.
MODEL_TYPES: dict[str, Family] = {
    "llama": DECODER,
    "qwen2": DECODER,
    "mistral": DECODER,
    "phi": DECODER,
    "phi3": DECODER,
    "aria_text": DECODER,
    "aria": ARIA,
    "internvl": INTERNVL_HF,
    "internvl_chat": INTERNVL_CHAT,
    "llava": LLAVA,
    "llava_next": LLAVA_NEXT,
    "smolvlm": SMOLVLM,
    "idefics3": IDEFICS3,
    "qwen2_audio": QWEN2_AUDIO,
    "idefics2": IDEFICS2,
    "instructblip": INSTRUCTBLIP,
    "blip-2": BLIP2,
    "clip": CLIP,
    "siglip": SIGLIP,
}


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json of a directory as a dict, or a CheckpointError saying what is wrong with it."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


def family_for(path: str | Path) -> tuple[str, Family]:
    """(architecture, family) for a Hugging Face directory, or a CheckpointError naming what we support."""
    path = Path(path)
    hf = read_hf_config(path)
    architectures = hf.get("architectures")
    supported = ", ".join(ARCHITECTURES)
    if architectures:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise CheckpointError(f"{path / 'config.json'}: 'architectures' must be a list of names")
        known = [a for a in architectures if a in ARCHITECTURES]
        if not known:
            raise CheckpointError(f"{path}: architecture {', '.join(architectures)} is not supported; "
                                  f"supported architectures: {supported}")
        return known[0], ARCHITECTURES[known[0]]
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES:
        return str(model_type), MODEL_TYPES[model_type]
    raise CheckpointError(f"{path / 'config.json'} names no architecture (model_type {model_type!r}); "
                          f"supported architectures: {supported}")
