"""The fused decode step: every layer of a quantized decoder for one token in one C++ call.

`quantize_model` installs it as the decoder's `decode_step` (see model/decoder.py); a decoder whose
linears were made some other way (a saved quantized checkpoint) gets it from `install(decoder)`.
It runs only where it computes what the layers would (kernels/decode.h: the same rounding points,
only summation orders differ): the C++ kernels are in use, no autograd, not under torch.compile, a
Llama-shaped decoder whose seven projections per layer are all `QuantLinear`s (a `LoRAQuantLinear`'s
float adapter included: the C++ step adds its rank-r update, see engine/lora.py). Anything else (the
reference kernels, a float LoRALinear, another decoder kind) returns None and the layers run as usual.

TINYOMNI_FUSED_DECODE=0 turns it off (to measure what it saves, or to rule it out when debugging).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from tinyomni.engine import ops
from tinyomni.engine.lora import LoRAQuantLinear
from tinyomni.engine.modules import QuantLinear
from tinyomni.model.decoder import MLP, Attention, CacheState, Decoder, DecoderLayer, RMSNorm

ENABLE_ENV = "TINYOMNI_FUSED_DECODE"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # the C++ side's order


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


class FusedDecode:
    """A decoder's `decode_step`: builds the C++ `DecodeStack` on first use (and again if the
    model's tensors were replaced, e.g. by `model.to(torch.bfloat16)`)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self._stack = None
        self._sources: list[Tensor] = []  # the tensors the stack was built from, to notice replacement
        self._unusable = ""  # why this decoder cannot be fused (then it never is)
        self._checked = False

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, attention_mask: Tensor | None,
                 cache: CacheState) -> Tensor | None:
        if (self._unusable or not enabled() or not ops.using_extension()
                or torch.is_grad_enabled() or torch.compiler.is_compiling() or x.device.type != "cpu"):
            return None
        stack = self._current(x.dtype)
        if stack is None:
            return None
        B = x.shape[0]
        slots = cache.positions.reshape(-1) if cache.positions.dim() == 1 else cache.positions[:, -1]
        if slots.numel() == 1 and B > 1:
            slots = slots.expand(B)
        key_valid = None if attention_mask is None else attention_mask.bool()
        return stack.forward(x, cos, sin, cache.kv.k, cache.kv.v, slots, cache.rows, cache.kv_len, key_valid)

    def why_not(self) -> str:
        """"" when the decoder can be fused, else the reason (for `describe` and tests)."""
        self._check()
        return self._unusable

    # --- building --------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        config = self.decoder.config
        for i, layer in enumerate(self.decoder.model.layers):
            kinds = (type(layer), type(layer.self_attn), type(layer.mlp), type(layer.input_layernorm),
                     type(layer.post_attention_layernorm))
            if kinds != (DecoderLayer, Attention, MLP, RMSNorm, RMSNorm):
                self._unusable = f"layer {i} is not a plain Llama layer"
                return
            linears = [layer.get_submodule(name) for name in PROJECTIONS]
            if not all(isinstance(m, QuantLinear) for m in linears):
                self._unusable = f"layer {i} has projections that are not quantized"
                return
            if len({m.passes for m in linears}) != 1:
                self._unusable = "layers mix activation formats"
                return
            if any(isinstance(m, LoRAQuantLinear) and m.lora_A.dtype != layer.input_layernorm.weight.dtype
                   for m in linears):
                self._unusable = f"layer {i} has a LoRA adapter in another dtype than its activations"
                return
        if config.attn_head_dim % 2 or config.num_attention_heads % config.num_key_value_heads:
            self._unusable = "head shapes the fused step does not take"
        elif config.hidden_act != "silu":
            self._unusable = f"activation {config.hidden_act!r} (the fused step is SwiGLU)"

    def _current(self, dtype: torch.dtype):
        self._check()
        if self._unusable:
            return None
        layers = self.decoder.model.layers
        # A cast or a reload replaces every tensor; checking the first and last layer's is enough
        # (and costs microseconds, where walking all 30 layers each token would cost ~0.5 ms).
        first, last = layers[0], layers[-1]
        sources = [first.input_layernorm.weight, first.self_attn.q_proj.qweight, last.mlp.down_proj.qweight,
                   last.post_attention_layernorm.weight]
        if self._stack is None or any(a is not b for a, b in zip(sources, self._sources)):
            self._stack = self._build(layers)
            self._sources = sources
        if first.input_layernorm.weight.dtype != dtype:
            return None  # RMSNorm would promote: leave mixed dtypes to the eager layers
        return self._stack

    def _build(self, layers):
        config = self.decoder.config
        norms, weights, biases, shapes, adapters = [], [], [], [], []
        passes = None
        for layer in layers:
            norms += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
            for name in PROJECTIONS:
                m = layer.get_submodule(name)
                if isinstance(m, LoRAQuantLinear):
                    adapters.append((len(biases), m.lora_A.detach(), m.lora_B.detach(), m.scaling))
                weights += [m.qweight, m.scales, m.mins]
                biases.append(None if m.bias is None else m.bias.detach())
                shapes += [4 if m.kind == "int4" else 8, m.in_features, m.out_features]
                passes = m.passes
        eps = layers[0].input_layernorm.eps
        stack = ops.extension().DecodeStack(norms, weights, biases, shapes, config.num_attention_heads,
                                            config.num_key_value_heads, config.attn_head_dim, eps, passes)
        for index, lora_A, lora_B, scaling in adapters:
            stack.set_adapter(index, lora_A, lora_B, scaling)
        return stack

    def __getstate__(self) -> dict:  # the C++ stack is rebuilt on use, not copied
        return {**self.__dict__, "_stack": None, "_sources": [], "_checked": False, "_unusable": ""}


def install(decoder: Decoder) -> None:
    """Give a decoder with quantized linears the fused decode step (a no-op where it cannot run)."""
    decoder.decode_step = FusedDecode(decoder)
