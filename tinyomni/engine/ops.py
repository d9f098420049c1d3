"""Which kernels run: the C++ ones when built and supported here, else the plain-PyTorch references.

`kernel_path()` says which (and why not the fast one); `use_reference()` switches to the references
at run time (tests, debugging), as the environment variable TINYOMNI_ENGINE=reference does at start.
`prefill_path()` says how prompts (more than 16 rows) run: the AMX GEMM where the CPU has AMX, else
dequantize + matmul; `use_gemm(False)` (or TINYOMNI_PREFILL=dequantize) picks the latter.
`batched_path()` says how batched decode steps (2..16 rows) run: AMX int8 tiles where the CPU has
AMX-INT8, else the VNNI GEMV; `use_batched(False)` (or TINYOMNI_BATCHED=0) picks the latter.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from tinyomni.engine.build import load_extension
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref

_extension, _reason = load_extension()
_forced_reference = False
PREFILL_ENV = "TINYOMNI_PREFILL"  # "dequantize" turns prefill's AMX GEMM off (see use_gemm)
_gemm_enabled = os.environ.get(PREFILL_ENV, "").lower() != "dequantize"
BATCHED_ENV = "TINYOMNI_BATCHED"  # "0" turns the AMX batched decode kernel off (see use_batched)
_batched_enabled = os.environ.get(BATCHED_ENV, "") != "0"

# The callables QuantLinear.forward uses; rebound by use_reference(). Eager calls go straight to the
# pybind11 functions (the least per-call overhead); compiled graphs use torch.ops.tinyomni.*.
int4_linear: Callable[..., Tensor] = int4_ref.linear
int8_linear: Callable[..., Tensor] = int8_ref.linear


def _bind() -> None:
    global int4_linear, int8_linear
    if _extension is not None and not _forced_reference:
        int4_linear, int8_linear = _extension.int4_linear, _extension.int8_linear
    else:
        int4_linear, int8_linear = int4_ref.linear, int8_ref.linear


def kernel_path() -> str:
    """"cpp-avx512-vnni" when the C++ kernels are in use, else "pytorch-reference (why)"."""
    if _extension is not None and not _forced_reference:
        return "cpp-avx512-vnni"
    return f"pytorch-reference ({'use_reference(True)' if _extension is not None else _reason})"


def using_extension() -> bool:
    """Whether quantized layers run the C++ kernels now (built, loadable, and not forced off)."""
    return _extension is not None and not _forced_reference


def has_extension() -> bool:
    """Whether the C++ kernels are built and loadable on this CPU (whatever use_reference says)."""
    return _extension is not None


def use_reference(flag: bool = True) -> None:
    """Force (or stop forcing) the plain-PyTorch reference kernels for every quantized layer."""
    global _forced_reference
    _forced_reference = flag
    _bind()


def prefill_path() -> str:
    """How quantized linears run prompts (more than 16 rows): "amx-gemm" (kernels/gemm, int8 tiles for
    fp32 activations, bf16 tiles for bf16 ones) or "dequantize+matmul (why)"."""
    if not using_extension():
        return f"dequantize+matmul ({kernel_path()})"
    if not _extension.gemm_supported():
        return "dequantize+matmul (this CPU lacks AMX-INT8/BF16, or Linux refused tile data)"
    if not _gemm_enabled:
        return f"dequantize+matmul (use_gemm(False) or {PREFILL_ENV}=dequantize)"
    return "amx-gemm"


def use_gemm(flag: bool = True) -> None:
    """Switch prefill's AMX GEMM on (default where supported) or off (the dequantize + matmul path),
    as TINYOMNI_PREFILL=dequantize does at start; for A/B measurements and debugging."""
    global _gemm_enabled
    _gemm_enabled = flag
    if _extension is not None:
        _extension.set_gemm_enabled(flag)


def batched_path() -> str:
    """How quantized linears run 2..16 rows (batched decode steps): "amx-int8" (kernels/batched, one
    tile product per block for all rows, the GEMV's results) or "vnni-gemv (why)"."""
    if not using_extension():
        return f"vnni-gemv ({kernel_path()})"
    if not _extension.batched_supported():
        return "vnni-gemv (this CPU lacks AMX-INT8, or Linux refused tile data)"
    if not _batched_enabled:
        return f"vnni-gemv (use_batched(False) or {BATCHED_ENV}=0)"
    return "amx-int8"


def use_batched(flag: bool = True) -> None:
    """Switch the AMX batched decode kernel on (default where supported) or off (the VNNI GEMV for
    every row count), as TINYOMNI_BATCHED=0 does at start; the results are the same either way."""
    global _batched_enabled
    _batched_enabled = flag
    if _extension is not None:
        _extension.set_batched_enabled(flag)


def extension():
    """The loaded C++ module (None when unavailable), for tests that call the kernels directly."""
    return _extension


if _extension is not None:
    # Shapes for torch.compile's tracing of the registered ops (the kernels themselves are C++).
    @torch.library.register_fake("tinyomni::int4_linear")
    def _int4_fake(x, qweight, scales, mins, bias, in_features, out_features, passes):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("tinyomni::int8_linear")
    def _int8_fake(x, qweight, scales, mins, bias, in_features, out_features, passes):
        return x.new_empty(*x.shape[:-1], out_features)

_bind()
use_gemm(_gemm_enabled)
use_batched(_batched_enabled)
