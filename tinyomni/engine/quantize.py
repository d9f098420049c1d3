"""Swap a built model's linear layers for weight-only int8/int4 ones, in place (gpt-fast style).

    from tinyomni.engine import quantize_model
    quantize_model(model.model, "int4")     # model = tinyomni.load("smollm2")

What each decoder weight becomes:
- mode "int4": GGUF Q4_0/Q4_1 blocks as they are; GGUF Q8_0 blocks as int8 (the file chose 8 bits
  for that tensor, usually the embedding/LM head, and requantizing to 4 would lose that); float
  weights quantized to int4, group 32, asymmetric (min/max).
- mode "int8": every GGUF block (Q8_0, Q4_0, Q4_1) held exactly in int8 blocks; float weights
  quantized to int8, group 32, asymmetric (min/max, 255 levels).
Both formats are w = d*q + m per block of 32 with fp16 d and m (see kernels/int4, kernels/int8).
GGUF blocks are used only where the model's weight still equals them (a fine-tuned or merged
weight is quantized from its float values instead). A LoRA layer left unmerged (model/lora.py; what
`tinyomni.load(..., quantize=...)` does for a checkpoint with an adapter) becomes a `LoRAQuantLinear`
(engine/lora.py): its base weight quantized as any other, so a GGUF base keeps the file's blocks, and
the adapter beside it in float. With tied embeddings the LM head and the token table share one
quantized tensor. The vision and audio towers stay float unless `towers=True`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from tinyomni.engine import fused
from tinyomni.engine.gguf_blocks import Blocks, index_tensors, read_blocks, supported, unpermute_order
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref
from tinyomni.engine.lora import LoRAQuantLinear
from tinyomni.engine.modules import ACTIVATIONS, KINDS, QuantEmbedding, QuantLinear
from tinyomni.model.lora import LoRALinear
from tinyomni.model.omni import OmniModel

log = logging.getLogger(__name__)


def quantize_weight(weight: Tensor, mode: str) -> Blocks:
    """A float weight [N, K] → canonical `Blocks` of `mode` ("int8" or "int4": group 32, min/max)."""
    if mode not in KINDS:
        raise ValueError(f"unknown quantization mode {mode!r} (expected one of {KINDS})")
    ref = int4_ref if mode == "int4" else int8_ref
    return Blocks(mode, *ref.quantize_codes(weight), weight.shape[1])


def dequantize_blocks(blocks: Blocks) -> Tensor:
    return int4_ref.dequantize_codes(blocks.codes, blocks.scales, blocks.mins, blocks.in_features)


def _concat(a: Blocks, b: Blocks) -> Blocks:
    return Blocks(a.kind, torch.cat([a.codes, b.codes]), torch.cat([a.scales, b.scales]),
                  torch.cat([a.mins, b.mins]), a.in_features)


def to_linear(blocks: Blocks, bias: Tensor | None = None, device: torch.device | str = "cpu",
              activations: str = "int8x2") -> QuantLinear:
    """Canonical blocks → a QuantLinear holding them packed for the kernel."""
    ref = int4_ref if blocks.kind == "int4" else int8_ref
    qweight, scales, mins = ref.pack(blocks.codes, blocks.scales, blocks.mins)
    return QuantLinear(blocks.kind, qweight.to(device), scales.to(device), mins.to(device),
                       None if bias is None else bias.detach().clone(), blocks.in_features, blocks.rows, activations)


def _matches(blocks: Blocks, weight: Tensor, samples: int = 64) -> bool:
    """Whether these file blocks are what the model's weight (its first blocks.rows rows) holds.

    Checks `samples` rows spread over the matrix: a fine-tuned or merged weight differs in every row,
    and comparing all 49k rows of an embedding would cost seconds per load.
    """
    if weight.shape[0] < blocks.rows or weight.shape[1] != blocks.in_features:
        return False
    rows = torch.linspace(0, blocks.rows - 1, min(samples, blocks.rows)).long()
    ours = weight.detach()[rows].float()
    theirs = dequantize_blocks(blocks.take_rows(rows))
    eps = torch.finfo(weight.dtype).eps
    return bool(((theirs - ours).abs() <= 4 * eps * (ours.abs() + float(ours.abs().max()))).all())


def _from_file(blocks: Blocks | None, weight: Tensor, mode: str, changed: str | None = None) -> Blocks:
    """The blocks for one weight: the file's when it matches (converted only when mode needs it),
    the rest (rows the model added, e.g. media tokens) quantized alike; else quantized from float, as
    `changed` when the file has blocks for it that the weight no longer is (a fine-tune, a merged LoRA)."""
    if blocks is None:
        return quantize_weight(weight, mode)
    if not _matches(blocks, weight):
        return quantize_weight(weight, changed or mode)
    if mode == "int8" and blocks.kind == "int4":  # the same d*q + m, codes 0..15 in 8-bit storage: exact
        blocks = Blocks("int8", blocks.codes, blocks.scales, blocks.mins, blocks.in_features)
    extra = weight.shape[0] - blocks.rows
    if extra:
        blocks = _concat(blocks, quantize_weight(weight.detach()[blocks.rows:], blocks.kind))
    return blocks


def gguf_source(model: OmniModel) -> Path | None:
    """The GGUF file the model's decoder was loaded from, when its config names one."""
    spec = model.config.base_decoder
    if spec is None:
        return None
    if spec == "smollm2":
        from tinyomni.checkpoints.gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    return Path(spec).expanduser() if spec.endswith(".gguf") else None


def read_gguf_blocks(path: str | Path, model: OmniModel) -> dict[str, Blocks]:
    """Quantized GGUF tensors as `Blocks`, keyed by our module names under `language_model`
    ("model.layers.3.mlp.up_proj", "model.embed_tokens", "lm_head"); q/k rows in transformers' order."""
    from tinyomni.checkpoints.gguf import GLOBAL_NAMES, LAYER_NAMES

    config = model.config.decoder
    found: dict[str, Blocks] = {}
    for tensor in index_tensors(path):
        if not supported(tensor.tensor_type.name) or not tensor.name.endswith(".weight"):
            continue
        if tensor.name.startswith("blk."):
            _, index, rest = tensor.name.split(".", 2)
            if rest not in LAYER_NAMES:
                continue
            ours = f"model.layers.{index}.{LAYER_NAMES[rest]}"
        elif tensor.name in GLOBAL_NAMES:
            ours = GLOBAL_NAMES[tensor.name]
        else:
            continue
        blocks = read_blocks(tensor)
        if tensor.name.endswith("attn_q.weight"):
            blocks = blocks.take_rows(unpermute_order(blocks.rows, config.num_attention_heads))
        elif tensor.name.endswith("attn_k.weight"):
            blocks = blocks.take_rows(unpermute_order(blocks.rows, config.num_key_value_heads))
        found[ours.removesuffix(".weight")] = blocks
    return found


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _quantized(linear: nn.Linear, blocks: Blocks | None, mode: str, activations: str,
               changed: str | None) -> QuantLinear:
    """One float linear as a QuantLinear; a LoRALinear as a LoRAQuantLinear (base quantized, adapter float)."""
    base = to_linear(_from_file(blocks, linear.weight, mode, changed), linear.bias, linear.weight.device, activations)
    return LoRAQuantLinear.around(base, linear) if isinstance(linear, LoRALinear) else base


def quantize_module(module: nn.Module, mode: str, blocks: dict[str, Blocks] | None = None,
                    activations: str = "int8x2", changed: str | None = None) -> int:
    """Replace every nn.Linear under `module` by a QuantLinear of `mode` (a LoRALinear by a
    LoRAQuantLinear); returns how many were swapped. `blocks`: file blocks by module name, used where
    they match the weight (`changed`: the kind for weights that no longer match their file blocks;
    default `mode`)."""
    blocks = blocks or {}
    count = 0
    adapters: list[str] = []  # LoRALinear names: their lora_A / lora_B children go with them
    for name, child in list(module.named_modules()):
        if any(name.startswith(f"{a}.") for a in adapters):
            continue
        if type(child) is nn.Linear or isinstance(child, LoRALinear):
            if isinstance(child, LoRALinear):
                adapters.append(name)
            _swap(module, name, _quantized(child, blocks.get(name), mode, activations, changed))
            count += 1
    return count


def quantize_model(model: OmniModel, mode: str, *, gguf: str | Path | bool = True, towers: bool = False,
                   activations: str = "int8x2") -> None:
    """Swap the decoder's nn.Linear layers (LM head included) for weight-only `mode` ones, in place.

    mode: "int8" or "int4". gguf: read quantized blocks from this GGUF file (True: the file the
    model's config names as its base decoder, if any; False: quantize every weight from float).
    towers: quantize the vision/audio towers and projectors too (float weights, same mode).
    activations: how the kernels quantize activations for their integer dot products: "int8x2"
    (default: two passes, ~16-bit, greedy text stays that of the float model) or "int8" (one pass,
    llama.cpp's q8 blocks: less compute, but near-tied tokens flip more often).
    """
    if mode not in KINDS:
        raise ValueError(f"unknown quantization mode {mode!r} (expected one of {KINDS})")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activation format {activations!r} (expected one of {sorted(ACTIVATIONS)})")
    decoder = model.language_model
    if any(isinstance(m, QuantLinear) for m in decoder.modules()):
        raise ValueError("this model is already quantized")
    path = gguf_source(model) if gguf is True else (Path(gguf) if gguf else None)
    blocks = read_gguf_blocks(path, model) if path is not None else {}
    # A merged fine-tune of a 4-bit file (tinyomni-world with its LoRA merged) is not requantized to 4
    # bits: the second rounding, on top of the file's, broke it (measured on tinyomni-world: logits
    # relative error 1.44 and a garbage answer in int4, 0.14 and the float model's answer in int8).
    # Its changed weights go to int8; the file's own blocks stay as they are. An adapter kept apart (a
    # LoRALinear, as load(quantize=...) leaves it) is not such a change: its base weights are still the
    # file's, so they keep the file's blocks, and the adapter stays float beside them.
    changed = "int8" if mode == "int4" and blocks else None
    embed = decoder.model.embed_tokens
    if decoder.config.tie_word_embeddings and decoder.lm_head.weight is embed.weight:
        source = blocks.get("model.embed_tokens", blocks.get("lm_head"))
        # Phi's tied head keeps its own bias; an adapter on the head applies to the head only.
        head = _quantized(decoder.lm_head, source, mode, activations, changed)
        decoder.lm_head = head
        decoder.model.embed_tokens = QuantEmbedding(head, embed.weight.dtype)
    count = quantize_module(decoder, mode, blocks, activations, changed)
    if changed:
        moved = sum(1 for name, m in decoder.named_modules() if isinstance(m, QuantLinear) and name in blocks
                    and m.kind != blocks[name].kind)
        if moved:
            log.warning("%d of %d decoder layers differ from %s's 4-bit blocks (a fine-tune): they are int8, "
                        "not requantized to int4", moved, count, path.name)
    fused.install(decoder)
    if towers:
        for part in (model.vision_tower, model.multi_modal_projector, model.audio_tower, model.audio_projector):
            if part is not None:
                count += quantize_module(part, mode, activations=activations)
    log.info("quantized %d linear layers to %s (%s)", count, mode, f"blocks from {path}" if blocks else "from float")


def describe(model: nn.Module) -> dict[str, int]:
    """Counts and bytes per weight format under `model` (quantized layers and remaining float ones)."""
    summary: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantLinear) and id(module) not in seen:
            seen.add(id(module))
            summary[f"{module.kind} layers"] = summary.get(f"{module.kind} layers", 0) + 1
            summary[f"{module.kind} bytes"] = summary.get(f"{module.kind} bytes", 0) + module.nbytes
            if isinstance(module, LoRAQuantLinear):
                summary["lora adapter bytes"] = summary.get("lora adapter bytes", 0) + module.lora_nbytes
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary["float parameter bytes"] = float_bytes
    return summary
