"""Random quantized-linear cases the kernel tests share: a weight quantized by a width's reference,
activations and a bias, all from one seed."""

from __future__ import annotations

import torch

from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref

REFS = {4: int4_ref, 8: int8_ref}


def random_case(bits: int, N: int, K: int, M: int, dtype: torch.dtype, seed: int):
    """(x [M, K] in dtype, qweight, scales, mins, bias [N]) for an N x K weight of `bits` bits."""
    gen = torch.Generator().manual_seed(seed)
    q, s, m = REFS[bits].quantize(torch.randn(N, K, generator=gen) * 0.1)
    x = torch.randn(M, K, generator=gen).to(dtype)
    return x, q, s, m, torch.randn(N, generator=gen)
