"""Quantized stand-ins for nn.Linear and nn.Embedding, with the same call signatures.

`QuantLinear` holds int8 or int4 blocks (see kernels/int8 and kernels/int4 for the layouts) and runs
whichever kernels `ops` selected. `QuantEmbedding` looks rows up in a `QuantLinear`'s blocks: with
tied embeddings (SmolLM2) the LM head and the token table are one quantized tensor, as in llama.cpp.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyomni.engine import ops
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref

KINDS = ("int8", "int4")
# How the kernels quantize activations: "int8" one pass per block of 32 (llama.cpp's q8, fastest),
# "int8x2" adds a pass over the rounding residual (~16-bit activations; weights still read once).
ACTIVATIONS = {"int8": 1, "int8x2": 2}


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as int8 or int4 blocks; x may be float32 or bfloat16, any leading shape."""

    def __init__(self, kind: str, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None,
                 in_features: int, out_features: int, activations: str = "int8x2") -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"unknown activation format {activations!r} (expected one of {sorted(ACTIVATIONS)})")
        if kind not in KINDS:
            raise ValueError(f"unknown quantized kind {kind!r} (expected one of {KINDS})")
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.activations = activations
        self.passes = ACTIVATIONS[activations]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # compiled graphs call the registered ops
            if self.kind == "int4":
                return torch.ops.tinyomni.int4_linear(x, self.qweight, self.scales, self.mins, self.bias,
                                                      self.in_features, self.out_features, self.passes)
            return torch.ops.tinyomni.int8_linear(x, self.qweight, self.scales, self.mins, self.bias,
                                                  self.in_features, self.out_features, self.passes)
        kernel = ops.int4_linear if self.kind == "int4" else ops.int8_linear
        return kernel(x, self.qweight, self.scales, self.mins, self.bias, self.in_features, self.out_features,
                      self.passes)

    def dequantize(self) -> Tensor:
        """The float32 weight [out_features, in_features] these blocks stand for."""
        ref = int4_ref if self.kind == "int4" else int8_ref
        return ref.dequantize(self.qweight, self.scales, self.mins, self.in_features, self.out_features)

    def dequantize_rows(self, rows: Tensor) -> Tensor:
        """Float32 rows [len(rows), in_features] of the weight (an embedding lookup), without the rest."""
        groups, lanes = rows // int8_ref.ROWS, rows % int8_ref.ROWS
        nb = self.scales.shape[1] // int8_ref.ROWS
        picked = torch.arange(len(rows), device=rows.device)
        if self.kind == "int4":
            byte = self.qweight[groups].view(-1, nb, 4, int4_ref.ROWS, 4)[picked, :, :, lanes]  # row b step j
            codes = torch.stack([byte & 0x0F, byte >> 4], dim=2).reshape(len(rows), nb, 32)
        else:
            codes = self.qweight[groups].view(-1, nb, 8, int8_ref.ROWS, 4)[picked, :, :, lanes]
            codes = codes.reshape(len(rows), nb, 32)
        d = self.scales[groups].view(-1, nb, int4_ref.ROWS)[picked, :, lanes]
        m = self.mins[groups].view(-1, nb, int4_ref.ROWS)[picked, :, lanes]
        return int4_ref.dequantize_codes(codes, d, m, self.in_features)  # the same arithmetic for both widths

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per full pass (codes, scales, mins)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def extra_repr(self) -> str:
        return (f"{self.kind} (group 32, {self.activations} activations), in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """Token lookup from a `QuantLinear`'s blocks (the tied LM head): rows are dequantized on demand.

    `weight` is a zero-row tensor that carries the lookups' dtype and device only (callers read
    `embed_tokens.weight.device`, `.dtype`, `.element_size()` to size caches); it follows `model.to()`.
    """

    def __init__(self, table: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("weight", torch.empty(0, table.in_features, dtype=dtype, device=table.qweight.device),
                             persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        flat = input_ids.reshape(-1)
        rows = self.table.dequantize_rows(flat).to(self.weight.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.kind} (shares the LM head's blocks)"
