"""A quantized linear with a float LoRA adapter beside it: y = W_q x (+ b) + scaling * B (A x).

Why: merging an adapter into a 4-bit base and quantizing the sum again rounds twice, and on
tinyomni-world (SmolLM2's Q4_1 plus a rank-16 adapter) that broke the model. Kept apart, as
llama.cpp's --lora and QLoRA do, the base keeps the GGUF file's own int4 blocks untouched and the
low-rank update runs in the activation dtype: ~r*(in+out) extra multiply-adds per token, a few
percent of the layer's.

`LoRAQuantLinear` is a `QuantLinear` (the same buffers under the same names, so checkpoints,
`describe`, the fused decode step and `QuantEmbedding` see its blocks) plus `lora_A` [r, in] and
`lora_B` [out, r] buffers (peft's shapes) and `scaling` (alpha / r). `dequantize()` stays the base
weight only; `merged_weight()` is what the layer computes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tinyomni.engine.modules import QuantLinear


class LoRAQuantLinear(QuantLinear):
    def __init__(self, base: QuantLinear, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        super().__init__(base.kind, base.qweight, base.scales, base.mins, base.bias, base.in_features,
                         base.out_features, base.activations)
        r = lora_A.shape[0]
        if lora_A.shape != (r, base.in_features) or lora_B.shape != (base.out_features, r):
            raise ValueError(f"LoRA shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit a "
                             f"{base.in_features} -> {base.out_features} layer")
        self.r = r
        self.scaling = float(scaling)
        self.register_buffer("lora_A", lora_A.detach())
        self.register_buffer("lora_B", lora_B.detach())

    @classmethod
    def around(cls, base: QuantLinear, adapter) -> LoRAQuantLinear:
        """`base` (the adapter's quantized base weight) with a `model/lora.LoRALinear`'s adapter."""
        return cls(base, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling)

    def forward(self, x: Tensor) -> Tensor:
        # The same ops, in the same order, as LoRALinear.forward (the fused decode step rounds alike).
        return super().forward(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> Tensor:
        """The float32 weight this layer stands for: the base blocks plus scaling * B @ A."""
        return self.dequantize() + (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @property
    def lora_nbytes(self) -> int:
        return self.lora_A.numel() * self.lora_A.element_size() + self.lora_B.numel() * self.lora_B.element_size()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.r}, scaling={self.scaling:g} ({self.lora_A.dtype})"
