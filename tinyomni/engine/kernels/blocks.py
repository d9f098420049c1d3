"""The arithmetic both weight formats share, in plain PyTorch: blocks of 32 inputs with an fp16 scale
d and minimum m each (w = d*q + m), whatever the code width. int4/ and int8/ differ only in how codes
are made and packed for their kernels; their `reference.py` call these on the canonical layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tinyomni.engine.kernels.activations import quantize_activations


def dequantize_codes(codes: Tensor, scales: Tensor, mins: Tensor, in_features: int) -> Tensor:
    """Canonical blocks (codes [N, blocks, 32], int16-held fp16 scales/mins [N, blocks]) → the float32
    weight [N, in_features] they stand for."""
    d = scales.view(torch.float16).float()[..., None]
    m = mins.view(torch.float16).float()[..., None]
    return (codes.float() * d + m).reshape(codes.shape[0], -1)[:, :in_features]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Dequantized weight + matmul in x's dtype: what a kernel computes, up to its activation rounding."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear_q8(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None, passes: int) -> Tensor:
    """A kernel's own arithmetic on canonical blocks (int8 activation blocks, integer dots, then the
    scales), in float64."""
    shape = x.shape
    dw, mw = scales.view(torch.float16).double(), mins.view(torch.float16).double()
    out = 0
    for xq, dx in quantize_activations(x.reshape(-1, shape[-1]), passes):
        dots = torch.einsum("mbi,nbi->mnb", xq.double(), codes.double())
        dx = dx.double()
        out = out + (dots * dw[None] * dx[:, None]).sum(-1) + (mw[None] * (dx * xq.double().sum(-1))[:, None]).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).view(*shape[:-1], -1)
