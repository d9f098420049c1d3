"""The fused decode step: every layer of a quantized decoder for one token in one C++ call.

`quantize_model` installs it as the decoder's `decode_step` (see model/decoder.py); a decoder whose
linears were made some other way (a saved quantized checkpoint) gets it from `install(decoder)`.
Where the token's two ends allow it too (a quantized LM head, an embedding the C++ side can read,
plain RoPE tables), it is also the decoder's `decode_logits`: token ids to logits in that one call.
Why: after the step has streamed ~70 MB of weights through the caches, each PyTorch op around it
(embedding lookup, rotary gather, final norm, the head's own call) ran 3-7x slower than in a warm
loop (measured 2026-12-02: ~0.4 ms a token in all, 10 % of an int4 SmolLM2 step).
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
from tinyomni.engine.modules import QuantEmbedding, QuantLinear
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
        self._head_unusable = ""  # why its ends (embedding, norm, head) stay outside (then logits() is None)
        self._checked = False
        self._has_ends = False  # whether the current stack holds them
        self._watched: list[tuple[torch.nn.Module, str]] = []  # (module, tensor name) whose replacement rebuilds
        self._rotary = None

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, attention_mask: Tensor | None,
                 cache: CacheState) -> Tensor | None:
        if not self._runnable(x.device):
            return None
        stack = self._current(x.dtype)
        if stack is None:
            return None
        slots, key_valid = self._slots(x.shape[0], attention_mask, cache)
        return stack.forward(x, cos, sin, cache.kv.k, cache.kv.v, slots, cache.rows, cache.kv_len, key_valid)

    def logits(self, input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
               cache: CacheState) -> Tensor | None:
        """The decoder's `decode_logits`: input_ids [B, 1] → logits [B, 1, vocab], or None."""
        if self._head_unusable or not self._runnable(input_ids.device):
            return None
        stack = self._current(None)
        if stack is None or not self._has_ends:
            return None
        # One token a row, so positions, slots and ids are B values (or one slot for all rows), as the
        # C++ side reads them; no PyTorch op here, each costs tens of µs right after a step (see above).
        positions = cache.positions if position_ids is None else position_ids  # hidden_states' default
        rotary = self._rotary
        return stack.forward_logits(input_ids, positions, rotary.cos, rotary.sin, cache.kv.k, cache.kv.v,
                                    cache.positions, cache.rows, cache.kv_len, attention_mask)

    def why_not(self) -> str:
        """"" when the decoder can be fused, else the reason (for `describe` and tests)."""
        self._check()
        return self._unusable

    def why_not_logits(self) -> str:
        """"" when whole decode steps (ids to logits) run fused, else the reason."""
        self._check()
        return self._unusable or self._head_unusable

    def _runnable(self, device: torch.device) -> bool:
        return not (self._unusable or not enabled() or not ops.using_extension() or torch.is_grad_enabled()
                    or torch.compiler.is_compiling() or device.type != "cpu")

    @staticmethod
    def _slots(B: int, attention_mask: Tensor | None, cache: CacheState) -> tuple[Tensor, Tensor | None]:
        slots = cache.positions.reshape(-1) if cache.positions.dim() == 1 else cache.positions[:, -1]
        if slots.numel() == 1 and B > 1:
            slots = slots.expand(B)
        return slots, None if attention_mask is None else attention_mask.bool()

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
        self._head_unusable = self._check_ends(linears[0].passes) if not self._unusable else ""
        layers, model = self.decoder.model.layers, self.decoder.model
        self._watched = [(layers[0].input_layernorm, "weight"), (layers[0].self_attn.q_proj, "qweight"),
                         (layers[-1].mlp.down_proj, "qweight"), (layers[-1].post_attention_layernorm, "weight"),
                         (model.norm, "weight"), (model.embed_tokens, "weight")]
        if isinstance(self.decoder.lm_head, QuantLinear):
            self._watched.append((self.decoder.lm_head, "qweight"))
        self._rotary = model.rotary_emb

    def _check_ends(self, passes: int) -> str:
        """Why the embedding, final norm and LM head cannot join the step ("" when they can)."""
        decoder = self.decoder
        kind = type(decoder)
        if kind.embed is not Decoder.embed or kind.hidden_states is not Decoder.hidden_states:
            return f"{kind.__name__} has its own embedding or body"
        head, embed = decoder.lm_head, decoder.model.embed_tokens
        if not isinstance(head, QuantLinear) or head.passes != passes:
            return "the LM head is not quantized as the layers are"
        if isinstance(head, LoRAQuantLinear) and head.lora_A.dtype != decoder.model.norm.weight.dtype:
            return "the LM head's adapter is in another dtype than its activations"
        if type(decoder.model.norm) is not RMSNorm:
            return "the final norm is not an RMSNorm"
        if not (isinstance(embed, QuantEmbedding) or type(embed) is torch.nn.Embedding):
            return f"embeddings of kind {type(embed).__name__}"
        if decoder.model.rotary_emb.long_from is not None:
            return "LongRoPE tables (chosen per sequence length)"
        return ""

    def _current(self, dtype: torch.dtype | None):
        """The C++ stack for activations of `dtype` (None: the stack's own), rebuilt if stale; or None."""
        self._check()
        if self._unusable:
            return None
        # A cast or a reload replaces every tensor; checking the first and last layer's and the ends'
        # is enough (walking all 30 layers each token would cost ~0.5 ms). The modules are the ones
        # _check accepted (it runs once), kept to spare the attribute walk down to them each token.
        sources = [getattr(module, name) for module, name in self._watched]
        if self._stack is None or any(a is not b for a, b in zip(sources, self._sources)):
            self._has_ends = False
            self._stack = self._build(self.decoder.model.layers)
            self._sources = sources
        if dtype is not None and sources[0].dtype != dtype:
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
        if not self._head_unusable and self._ends_match(norms[0].dtype):
            self._add_ends(stack, len(biases))
            self._has_ends = True
        for index, lora_A, lora_B, scaling in adapters:
            stack.set_adapter(index, lora_A, lora_B, scaling)
        return stack

    def _ends_match(self, dtype: torch.dtype) -> bool:
        model = self.decoder.model
        return model.norm.weight.dtype == dtype and model.embed_tokens.weight.dtype == dtype

    def _add_ends(self, stack, head_index: int) -> None:
        """Embedding, final norm and LM head into `stack` (the head as linear `head_index`)."""
        model, head = self.decoder.model, self.decoder.lm_head
        bits = 4 if head.kind == "int4" else 8
        bias = None if head.bias is None else head.bias.detach()
        stack.set_head(model.norm.weight.detach(), model.norm.eps, head.qweight, head.scales, head.mins, bias, bits,
                       head.out_features)
        if isinstance(head, LoRAQuantLinear):
            stack.set_adapter(head_index, head.lora_A.detach(), head.lora_B.detach(), head.scaling)
        embed = model.embed_tokens
        if isinstance(embed, QuantEmbedding):
            table = embed.table
            stack.set_embedding_blocks(table.qweight, table.scales, table.mins, 4 if table.kind == "int4" else 8,
                                       table.out_features)
        else:
            stack.set_embedding_table(embed.weight.detach().contiguous())

    def __getstate__(self) -> dict:  # the C++ stack is rebuilt on use, not copied
        return {**self.__dict__, "_stack": None, "_sources": [], "_checked": False, "_unusable": "",
                "_head_unusable": "", "_has_ends": False, "_watched": [], "_rotary": None}


def install(decoder: Decoder) -> None:
    """Give a decoder with quantized linears the fused decode step (a no-op where it cannot run)."""
    step = FusedDecode(decoder)
    decoder.decode_step = step
    decoder.decode_logits = step.logits
