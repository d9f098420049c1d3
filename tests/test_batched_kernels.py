"""Batched decode on AMX int8 tiles (tinyomni/engine/kernels/batched) against the int4/int8 references
(`linear_q8`: the kernels' own arithmetic) and bit for bit against the VNNI GEMV it stands in for, the
linears' and the fused decode step's dispatch to it for 2..16 rows, and the switch that turns it off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import REFS, random_case

from tinyomni.engine import QuantLinear, ops

needs_kernels = pytest.mark.skipif(not ops.has_extension(), reason=f"C++ kernels unavailable: {ops.kernel_path()}")
needs_batched = pytest.mark.skipif(not (ops.has_extension() and ops.extension().batched_supported()),
                                   reason=f"AMX int8 batched kernel unavailable: {ops.batched_path()}")
# (output rows, input features): outputs not a multiple of 16, inputs not a multiple of 32 (odd and
# even block counts, the kernel pipelines blocks in pairs), one block, and SmolLM2's down_proj width.
SHAPES = [(37, 70), (16, 32), (50, 100), (1, 40), (24, 1536), (200, 576)]


@pytest.fixture(autouse=True)
def _batched_back_on():
    yield
    ops.use_batched(True)
    ops.use_reference(False)


def _gemv(bits: int):
    ext = ops.extension()
    return ext.int4_linear if bits == 4 else ext.int8_linear


@needs_batched
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("passes", [1, 2])
def test_batched_matches_reference_and_gemv_on_odd_shapes(bits, dtype, passes):
    ext = ops.extension()
    for i, (N, K) in enumerate(SHAPES):
        for M in range(2, 17) if i == 0 else (2, 3, 8, 13, 16):
            x, q, s, m, bias = random_case(bits, N, K, M, dtype, seed=100 * i + M)
            b = bias if M % 2 else None
            got = ext.batched_linear(x, q, s, m, b, K, N, bits, passes)
            assert got.dtype == dtype and got.shape == (M, N)
            # The kernels' arithmetic in float64: equal up to float32 summation order (and the
            # output's rounding to bf16).
            want = REFS[bits].linear_q8(x, q, s, m, b, K, N, passes).float()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (N, K, M)
            # The same operations in the same order as the VNNI GEMV: its results bit for bit.
            ops.use_batched(False)
            assert torch.equal(got, _gemv(bits)(x, q, s, m, b, K, N, passes)), (N, K, M)
            ops.use_batched(True)


@needs_batched
def test_batched_takes_one_row_too():
    """The dispatch sends 2..16 rows; the direct entry point also takes one (the GEMV's arithmetic)."""
    ext = ops.extension()
    for bits in (4, 8):
        x, q, s, m, bias = random_case(bits, 37, 70, 1, torch.float32, seed=bits)
        got = ext.batched_linear(x, q, s, m, bias, 70, 37, bits, 2)
        assert torch.equal(got, _gemv(bits)(x, q, s, m, bias, 70, 37, 2))


@needs_batched
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_batches_take_the_kernel_and_switch_off(kind, dtype):
    bits = 4 if kind == "int4" else 8
    x, q, s, m, bias = random_case(bits, 40, 96, 6, dtype, seed=7)
    layer = QuantLinear(kind, q, s, m, bias, 96, 40)
    assert ops.batched_path() == "amx-int8"
    got = layer(x.view(2, 3, 96))  # leading dims flattened: 6 rows, a batched decode step
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    assert torch.equal(got.view(6, 40), ops.extension().batched_linear(x, q, s, m, bias, 96, 40, bits, 2))
    ops.use_batched(False)
    assert ops.batched_path().startswith("vnni-gemv (use_batched(False)")
    assert torch.equal(layer(x.view(2, 3, 96)), got)


@needs_batched
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_is_the_same_with_the_batched_kernel(monkeypatch, mode, dtype):
    """The fused decode step (kernels/decode.cpp) calls the GEMVs, which hand 3-row steps to the batched
    kernel: logits and KV cache identical with it switched off."""
    from test_quant import _decode, _odd_decoder

    decoder = _odd_decoder(mode, True)
    on_logits, on_cache = _decode(decoder, monkeypatch, True, dtype, True)
    ops.use_batched(False)
    off_logits, off_cache = _decode(decoder, monkeypatch, True, dtype, True)
    assert torch.equal(on_logits, off_logits) and torch.equal(on_cache, off_cache)


@needs_batched
def test_batched_rejects_what_it_cannot_run():
    ext = ops.extension()
    x, q, s, m, _ = random_case(4, 40, 64, 4, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="int4 qweight must be"):
        ext.batched_linear(x, q[:, :-1].contiguous(), s, m, None, 64, 40, 4, 1)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ext.batched_linear(x, q, s, m, None, 64, 40, 5, 1)
    with pytest.raises(RuntimeError, match="1..16 rows"):
        ext.batched_linear(torch.randn(17, 64), q, s, m, None, 64, 40, 4, 1)
    with pytest.raises(RuntimeError, match="activation passes must be 1 or 2"):
        ext.batched_linear(x, q, s, m, None, 64, 40, 4, 3)


def test_batched_path_says_why_not():
    """Without AMX-INT8 (or the C++ kernels) batched steps keep the VNNI GEMV, and the path says why."""
    path = ops.batched_path()
    if not ops.has_extension():
        assert path.startswith("vnni-gemv (pytorch-reference")
    elif not ops.extension().batched_supported():
        assert path == "vnni-gemv (this CPU lacks AMX-INT8, or Linux refused tile data)"
        x, q, s, m, _ = random_case(4, 40, 64, 4, torch.float32, seed=1)
        with pytest.raises(RuntimeError, match="not available on this CPU"):
            ops.extension().batched_linear(x, q, s, m, None, 64, 40, 4, 1)
    else:
        assert path == "amx-int8"
        ops.use_batched(False)
        assert path != ops.batched_path()


@needs_kernels
def test_environment_variable_turns_the_batched_kernel_off():
    code = "from tinyomni.engine import ops; print(ops.batched_path())"
    env = {**os.environ, "TINYOMNI_BATCHED": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("vnni-gemv (")
