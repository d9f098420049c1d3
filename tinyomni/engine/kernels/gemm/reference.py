"""What prefill's AMX GEMM (gemm.cpp) computes, in plain PyTorch, for the tests to compare against.

The kernel takes many activation rows against one packed int4 or int8 weight and computes what the
float path it replaces computed (dequantize the weight, then F.linear in the activations' dtype):
- bfloat16: the weight dequantized to bf16 (w = d*q + m, rounded to nearest even) times the bf16
  activations, summed in float32, the bias added in bf16's value, the result rounded to bf16: equal to
  this reference up to summation order;
- float32: activations and weights each as bf16 hi + lo, hi*hi + hi*lo + lo*hi summed in float32:
  this reference to ~2^-16 of each product (`split_bf16` below is that arithmetic, in plain PyTorch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref


def linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None, in_features: int,
           out_features: int, bits: int) -> Tensor:
    """y = x W^T + b for packed `bits` 4 or 8 blocks: dequantize, then F.linear in x's dtype."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"activations must be float32 or bfloat16, got {x.dtype}")
    ref = int4_ref if bits == 4 else int8_ref
    return ref.linear(x, qweight, scales, mins, bias, in_features, out_features)


def split_bf16(t: Tensor) -> tuple[Tensor, Tensor]:
    """float32 t → (hi, lo) bfloat16 with t ≈ hi + lo (to ~2^-17 of |t|), the kernel's fp32 split."""
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def linear_split(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None, in_features: int,
                 out_features: int, bits: int) -> Tensor:
    """The kernel's fp32 arithmetic: hi*hi + hi*lo + lo*hi of the bf16 splits, in float64."""
    ref = int4_ref if bits == 4 else int8_ref
    (xh, xl), (wh, wl) = split_bf16(x.float()), split_bf16(ref.dequantize(qweight, scales, mins, in_features,
                                                                          out_features))
    xh, xl, wh, wl = (t.double() for t in (xh, xl, wh, wl))
    out = xh @ wh.T + xh @ wl.T + xl @ wh.T
    if bias is not None:
        out = out + bias.double()
    return out.float()
