"""Reference for the kernels' activation quantization: int8 per block of 32, as llama.cpp's q8 blocks.

The C++ kernels quantize each activation row this way before the integer dot products; this function
does the same arithmetic in PyTorch (same rounding: half to even) so tests can check the kernels to
float-summation-order accuracy, separately from the (larger) error quantization itself adds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QK = 32  # values per block, weights and activations alike


def quantize_block(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Float blocks [..., 32] → (codes int8 [..., 32], scales float32 [...])."""
    d = blocks.abs().amax(-1) / 127.0
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.round(blocks * inverse[..., None]).to(torch.int8)
    return codes, d


def quantize_activations(x: Tensor, passes: int = 1) -> list[tuple[Tensor, Tensor]]:
    """x [M, K] float → per pass (codes int8 [M, blocks, 32], scales float32 [M, blocks]); K zero-padded.

    passes=2 quantizes the rounding residual again: x ≈ d*q + d2*q2, as the kernels do when asked
    for two-pass ("int8x2") activations.
    """
    x = x.float()
    blocks = F.pad(x, (0, -x.shape[-1] % QK)).view(x.shape[0], -1, QK)
    codes, d = quantize_block(blocks)
    out = [(codes, d)]
    if passes == 2:
        out.append(quantize_block(blocks - codes.float() * d[..., None]))
    return out
