"""Prefill's AMX GEMM (tinyomni/engine/kernels/gemm) against its plain-PyTorch reference, and the
linears' dispatch to it for prompts (more than 16 rows) with the dequantize + matmul path as fallback."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import random_case

from tinyomni.engine import QuantLinear, ops
from tinyomni.engine.kernels.gemm import reference as gemm_ref

needs_gemm = pytest.mark.skipif(not (ops.has_extension() and ops.extension().gemm_supported()),
                                reason=f"AMX GEMM unavailable: {ops.prefill_path()}")
# (output rows, input features): outputs not a multiple of 16 (nor of 32, the kernel's pairs of row
# groups), inputs not a multiple of 32, and a 1536-input projection like SmolLM2's down_proj.
SHAPES = [(37, 70), (16, 32), (50, 100), (24, 1536)]
ROWS = [1, 2, 7, 33, 130]  # activation rows: single, odd, and partial 16-row tiles


@pytest.fixture(autouse=True)
def _gemm_back_on():
    yield
    ops.use_gemm(True)
    ops.use_reference(False)


@needs_gemm
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_matches_reference_on_odd_shapes(bits, dtype):
    ext = ops.extension()
    for i, (N, K) in enumerate(SHAPES):
        for M in ROWS:
            x, q, s, m, bias = random_case(bits, N, K, M, dtype, seed=100 * i + M)
            for b in (bias, None):
                got = ext.gemm_linear(x, q, s, m, b, K, N, bits)
                assert got.dtype == dtype and got.shape == (M, N)
                want = gemm_ref.linear(x, q, s, m, b, K, N, bits)
                scale = want.float().abs().max().item()
                if dtype == torch.bfloat16:
                    # The float path's own numbers up to fp32 summation order: at most one bf16 rounding
                    # step apart, and almost every element identical.
                    diff = (got.float() - want.float()).abs()
                    assert diff.max().item() <= 2 ** -7 * scale, (N, K, M)
                    assert (got != want).float().mean().item() < 0.02, (N, K, M)
                else:
                    # The kernel's hi/lo bf16 arithmetic (float64 here) to summation order, and the fp32
                    # float path to ~2^-16 of each product.
                    split = gemm_ref.linear_split(x, q, s, m, b, K, N, bits)
                    assert (got - split).abs().max().item() <= 1e-6 * scale, (N, K, M)
                    assert (got - want).abs().max().item() <= 1e-4 * scale, (N, K, M)


@needs_gemm
def test_reference_split_is_close_to_fp32():
    """The reference's hi/lo arithmetic itself is what the kernel claims: fp32 to ~1e-5, unlike bf16."""
    x, q, s, m, _ = random_case(4, 40, 96, 9, torch.float32, seed=3)
    fp32 = gemm_ref.linear(x, q, s, m, None, 96, 40, 4)
    split = gemm_ref.linear_split(x, q, s, m, None, 96, 40, 4)
    bf16 = gemm_ref.linear(x.bfloat16(), q, s, m, None, 96, 40, 4).float()
    scale = fp32.abs().max().item()
    assert (split - fp32).abs().max().item() < 1e-5 * scale < (bf16 - fp32).abs().max().item()


@needs_gemm
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_prompts_take_the_gemm_and_fall_back(kind, dtype):
    bits = 4 if kind == "int4" else 8
    x, q, s, m, bias = random_case(bits, 40, 64, 33, dtype, seed=7)
    layer = QuantLinear(kind, q, s, m, bias, 64, 40)
    assert ops.prefill_path() == "amx-gemm"
    got = layer(x.view(3, 11, 64))  # leading dims flattened: 33 rows > 16, the GEMM
    assert got.shape == (3, 11, 40) and got.dtype == dtype
    assert torch.equal(got.view(33, 40), ops.extension().gemm_linear(x, q, s, m, bias, 64, 40, bits))
    ops.use_gemm(False)
    assert ops.prefill_path().startswith("dequantize+matmul")
    fallback = layer(x.view(3, 11, 64))
    ops.use_reference(True)
    reference = layer(x.view(3, 11, 64))
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7
    for y in (got, fallback):
        assert (y.float() - reference.float()).abs().max().item() <= tol * reference.float().abs().max().item()


@needs_gemm
def test_gemm_rejects_bad_weights():
    x, q, s, m, _ = random_case(4, 40, 64, 20, torch.float32, seed=1)
    ext = ops.extension()
    with pytest.raises(RuntimeError, match="int4 qweight must be"):
        ext.gemm_linear(x, q[:, :-1].contiguous(), s, m, None, 64, 40, 4)
    with pytest.raises(RuntimeError, match="expected 64 input features"):
        ext.gemm_linear(x[:, :32].contiguous(), q, s, m, None, 64, 40, 4)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ext.gemm_linear(x, q, s, m, None, 64, 40, 5)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        gemm_ref.linear(x, q, s, m, None, 64, 40, 5)
