"""int4 group-32 weights, asymmetric (w = d*q + m, q in 0..15): GGUF Q4_1's arithmetic, Q4_0 included.

Two layouts. Canonical (what GGUF blocks and `quantize_codes` give): codes uint8 [N, blocks, 32],
scales and mins [N, blocks]. Packed (what the kernel reads, see int4.cpp): rows interleaved in
groups of 16, two codes a byte, `pack` and `unpack` convert. Scales and mins are int16 tensors
holding the fp16 bits, so casting a model's float buffers (model.to(torch.bfloat16)) leaves them alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tinyomni.engine.kernels import blocks as shared
from tinyomni.engine.kernels.activations import QK
from tinyomni.engine.kernels.blocks import dequantize_codes

ROWS = 16  # rows per interleaved group


def quantize_codes(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float weight [N, K] → canonical (codes uint8 [N, blocks, 32], scales int16, mins int16 [N, blocks]).

    Min/max per block, like llama.cpp's Q4_1. K is zero-padded to a multiple of 32.
    """
    w = weight.detach().float()
    N, K = w.shape
    blocks = F.pad(w, (0, -K % QK)).view(N, -1, QK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = ((hi - lo) / 15.0).to(torch.float16)
    m = lo.to(torch.float16)
    # Codes from the fp16-rounded scale and min, the values the kernel will use.
    d32, m32 = d.float(), m.float()
    inverse = torch.where(d32 != 0, 1.0 / d32, torch.zeros_like(d32))
    codes = torch.round((blocks - m32[..., None]) * inverse[..., None]).clamp(0, 15).to(torch.uint8)
    return codes, d.view(torch.int16), m.view(torch.int16)


def pack(codes: Tensor, scales: Tensor, mins: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Canonical → packed (qweight uint8 [groups, blocks*256], scales and mins int16 [groups, blocks*16])."""
    N, nb, _ = codes.shape
    pad = -N % ROWS
    G = (N + pad) // ROWS
    c = F.pad(codes, (0, 0, 0, 0, 0, pad)).view(G, ROWS, nb, 2, 4, 4)  # g r b half step j
    byte = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # g r b step j
    qweight = byte.permute(0, 2, 3, 1, 4).reshape(G, nb * 256).contiguous()

    def spread(t: Tensor) -> Tensor:
        return F.pad(t, (0, 0, 0, pad)).view(G, ROWS, nb).transpose(1, 2).reshape(G, nb * ROWS).contiguous()

    return qweight, spread(scales), spread(mins)


def unpack(qweight: Tensor, scales: Tensor, mins: Tensor, out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed → canonical (codes uint8 [N, blocks, 32], scales, mins int16 [N, blocks])."""
    G, nb = qweight.shape[0], qweight.shape[1] // 256
    byte = qweight.view(G, nb, 4, ROWS, 4).permute(0, 3, 1, 2, 4)  # g r b step j
    codes = torch.stack([byte & 0x0F, byte >> 4], dim=3).reshape(G * ROWS, nb, QK)[:out_features]

    def gather(t: Tensor) -> Tensor:
        return t.view(G, nb, ROWS).transpose(1, 2).reshape(G * ROWS, nb)[:out_features]

    return codes, gather(scales), gather(mins)


def quantize(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float weight [N, K] → packed (qweight, scales, mins), ready for the kernel."""
    return pack(*quantize_codes(weight))


def dequantize(qweight: Tensor, scales: Tensor, mins: Tensor, in_features: int, out_features: int) -> Tensor:
    """Packed blocks → the float32 weight [out_features, in_features]."""
    return dequantize_codes(*unpack(qweight, scales, mins, out_features), in_features)


def linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None, in_features: int,
           out_features: int, passes: int = 1) -> Tensor:
    """Dequantize + matmul: what the kernel computes, up to its activation quantization (so `passes`,
    kept for the kernel's signature, changes nothing here)."""
    return shared.linear(x, dequantize(qweight, scales, mins, in_features, out_features), bias)


def linear_q8(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None, in_features: int,
              out_features: int, passes: int = 1) -> Tensor:
    """The kernel's own arithmetic (int8 activation blocks, integer dots, then scales), in float64."""
    return shared.linear_q8(x, *unpack(qweight, scales, mins, out_features), bias, passes)
