"""The fast CPU engine: quantized kernels against their plain-PyTorch references, the fallback path,
GGUF block decoding against the gguf package, and greedy text of the quantized real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tinyomni
from tinyomni.engine import QuantEmbedding, QuantLinear, fused, kernel_path, ops, quantize_model, use_reference
from tinyomni.engine.gguf_blocks import index_tensors, read_blocks
from tinyomni.engine.kernels.activations import quantize_activations
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref
from tinyomni.engine.quantize import dequantize_blocks

REFS = {"int4": int4_ref, "int8": int8_ref}
needs_kernels = pytest.mark.skipif(not ops.has_extension(), reason=f"C++ kernels unavailable: {kernel_path()}")
# (activation rows, output rows, input features): rows not a multiple of 16, inputs not of 32, a single
# row, batches that take the 4-row and 2-row tiles, and > 16 rows (the dequantize + GEMM path).
SHAPES = [(1, 33, 64), (3, 17, 96), (5, 40, 576), (1, 1, 32), (7, 11, 40), (2, 50, 70), (20, 21, 100)]


@pytest.fixture(autouse=True)
def _kernels_not_forced_off():
    yield
    use_reference(False)


def _kernel(kind: str):
    ext = ops.extension()
    return ext.int4_linear if kind == "int4" else ext.int8_linear


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("passes", [1, 2])
def test_kernel_matches_reference_on_odd_shapes(kind, dtype, passes):
    ref = REFS[kind]
    gen = torch.Generator().manual_seed(1)
    for M, N, K in SHAPES:
        w, x, bias = torch.randn(N, K, generator=gen), torch.randn(M, K, generator=gen), torch.randn(N, generator=gen)
        q, s, m = ref.quantize(w)
        got = _kernel(kind)(x.to(dtype), q, s, m, bias, K, N, passes).float()
        assert got.shape == (M, N)
        # The kernel's own arithmetic (quantized activations), up to float summation order and the
        # output's rounding; above 16 rows the kernel dequantizes and runs a GEMM on float activations.
        same_math = ref.linear_q8 if M <= 16 else ref.linear
        exact = same_math(x.to(dtype), q, s, m, bias, K, N, passes).float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got, exact, rtol=tol, atol=tol * exact.abs().max().item()), (M, N, K)
        # And dequantize + matmul, within what activation quantization costs (~1/254 of a block's
        # range for one pass, ~1/64000 for two).
        plain = ref.linear(x, q, s, m, bias, K, N)
        scale = plain.abs().max().item()
        err = (got - plain).abs().max().item() / scale
        assert err < (2e-2 if passes == 1 else 2e-3) + (1e-2 if dtype == torch.bfloat16 else 0), (M, N, K, err)


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kernel_takes_any_leading_shape_and_dequantizes_like_the_reference(kind):
    ref = REFS[kind]
    w = torch.randn(45, 70)
    q, s, m = ref.quantize(w)
    x = torch.randn(2, 3, 70)
    out = _kernel(kind)(x, q, s, m, None, 70, 45, 2)
    assert out.shape == (2, 3, 45)
    assert torch.allclose(out.reshape(6, 45), _kernel(kind)(x.reshape(6, 70), q, s, m, None, 70, 45, 2))
    dequantize = ops.extension().int4_dequantize if kind == "int4" else ops.extension().int8_dequantize
    assert torch.equal(dequantize(q, s, m, 70, 45, torch.float32), ref.dequantize(q, s, m, 70, 45))
    # Prefill's bf16 weight is written directly, rounded as a cast of the float32 one would be.
    assert torch.equal(dequantize(q, s, m, 70, 45, torch.bfloat16), ref.dequantize(q, s, m, 70, 45).bfloat16())


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_pack_unpack_round_trip_and_quantization_error(kind):
    ref = REFS[kind]
    w = torch.randn(37, 75)
    codes, d, m = ref.quantize_codes(w)
    back = ref.unpack(*ref.pack(codes, d, m), 37)
    assert all(torch.equal(a, b) for a, b in zip((codes, d, m), back))
    levels = 15 if kind == "int4" else 255
    err = (ref.dequantize(*ref.pack(codes, d, m), 75, 37) - w).abs()
    blocks = torch.nn.functional.pad(w, (0, 96 - 75)).view(37, 3, 32)
    step = (blocks.amax(-1) - blocks.amin(-1)) / levels  # half a step, plus fp16 rounding of d and m
    assert (err.view(37, -1)[:, :75] <= (0.51 * step.repeat_interleave(32, 1)[:, :75] + 1e-3)).all()


def test_activation_quantization_two_passes_is_finer():
    x = torch.randn(4, 96) * 3
    one = quantize_activations(x)
    two = quantize_activations(x, passes=2)
    approx1 = (one[0][0].float() * one[0][1][..., None]).view(4, -1)
    approx2 = approx1 + (two[1][0].float() * two[1][1][..., None]).view(4, -1)
    assert (approx1 - x).abs().max() < 3 / 127 * x.abs().max()
    assert (approx2 - x).abs().max() < (approx1 - x).abs().max() / 50


def test_reference_fallback_is_used_when_forced(tiny):
    layer = QuantLinear("int4", *int4_ref.quantize(torch.randn(24, 64)), None, 64, 24)
    x = torch.randn(3, 64)
    use_reference(True)
    assert kernel_path().startswith("pytorch-reference")
    expected = int4_ref.linear(x, layer.qweight, layer.scales, layer.mins, None, 64, 24)
    assert torch.equal(layer(x), expected)
    use_reference(False)
    assert kernel_path() == ("cpp-avx512-vnni" if ops.has_extension() else kernel_path())


def test_environment_variable_selects_the_reference_path():
    code = "from tinyomni.engine import kernel_path; print(kernel_path())"
    env = {**os.environ, "TINYOMNI_ENGINE": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pytorch-reference (TINYOMNI_ENGINE=reference)"


def test_a_missing_build_falls_back_with_a_reason(tmp_path):
    code = "from tinyomni.engine import kernel_path, quantize_model; print(kernel_path())"
    env = {**os.environ, "TINYOMNI_ENGINE_CACHE": str(tmp_path)}  # an empty cache: nothing built there
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("pytorch-reference (kernels not built (run `python -m tinyomni.engine.build`")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_like_gguf(type_name):
    from gguf import GGMLQuantizationType, dequantize, quantize

    qtype = GGMLQuantizationType[type_name]
    weights = np.random.default_rng(0).standard_normal((19, 96)).astype(np.float32)
    packed = quantize(weights, qtype)
    tensor = SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=qtype, shape=[96, 19], data=packed)
    blocks = read_blocks(tensor)
    assert blocks.kind == ("int8" if type_name == "Q8_0" else "int4")
    expected = torch.from_numpy(dequantize(packed, qtype).reshape(19, 96))
    assert torch.equal(dequantize_blocks(blocks), expected)
    ref = REFS[blocks.kind]
    assert torch.equal(ref.dequantize(*ref.pack(blocks.codes, blocks.scales, blocks.mins), 96, 19), expected)


def test_gguf_index_matches_the_gguf_reader():
    import gguf

    from tinyomni.checkpoints.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    ours = index_tensors(path)
    theirs = gguf.GGUFReader(path).tensors
    assert [(t.name, t.tensor_type, t.shape) for t in ours] == [
        (t.name, t.tensor_type, [int(d) for d in t.shape]) for t in theirs]
    for a, b in zip(ours[:3], theirs[:3]):
        assert np.array_equal(np.asarray(a.data).reshape(-1), np.asarray(b.data).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_swaps_linears_and_keeps_the_tied_embedding(mode):
    model = tinyomni.tiny_random_model(seed=0)
    decoder = model.model.language_model
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.inference_mode():
        before, _ = decoder(input_ids=ids)
        table = decoder.model.embed_tokens.weight.clone()
    quantize_model(model.model, mode)
    assert not any(type(m) is torch.nn.Linear for m in decoder.modules())
    assert isinstance(decoder.lm_head, QuantLinear) and isinstance(decoder.model.embed_tokens, QuantEmbedding)
    assert decoder.model.embed_tokens.table is decoder.lm_head  # one quantized tensor, as when tied
    with torch.inference_mode():
        looked_up = decoder.model.embed_tokens(ids)
        assert torch.allclose(looked_up, decoder.lm_head.dequantize()[ids])
        assert (looked_up - table[ids]).abs().max() < (0.02 if mode == "int8" else 0.2) * table.abs().max()
        after, _ = decoder(input_ids=ids)
    assert torch.allclose(after, before, atol=(0.05 if mode == "int8" else 0.5) * before.abs().max().item())
    assert model.model.vision_tower is not None and any(
        type(m) is torch.nn.Linear for m in model.model.vision_tower.modules())  # towers stay float by default
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model.model, mode)


def test_bfloat16_cast_keeps_the_quantized_scales():
    model = tinyomni.tiny_random_model(seed=0)
    quantize_model(model.model, "int4")
    head = model.model.language_model.lm_head
    scales = head.scales.clone()
    model.model.to(torch.bfloat16)
    assert head.scales.dtype == torch.int16 and torch.equal(head.scales, scales)
    assert model.model.language_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.chat("Hi", max_new_tokens=4) is not None


def test_unknown_modes_are_refused(tiny):
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_model(tiny.model, "int3")
    with pytest.raises(ValueError, match="unknown activation format"):
        quantize_model(tiny.model, "int8", activations="fp8")


# --- the real model ------------------------------------------------------------------------------
QUESTIONS = [json.loads(line)["question"] for line in
             (Path(__file__).parents[1] / "examples" / "text_qa.jsonl").read_text().splitlines() if line.strip()]


def _greedy(model: tinyomni.Model) -> list[list[int]]:
    """32 greedy tokens per text-QA question, in batches of 8 (decode steps take the 4-row tiles)."""
    out = []
    for i in range(0, len(QUESTIONS), 8):
        out += [c.token_ids for c in model.complete_batch(QUESTIONS[i:i + 8], max_new_tokens=32)]
    return out


@pytest.fixture(scope="module")
def float_answers(smollm2) -> list[list[int]]:
    return _greedy(smollm2)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("mode, gguf, at_least", [
    ("int8", True, 0.95),  # the GGUF's blocks, held exactly: measured 40/40
    ("int4", True, 0.95),  # the GGUF's own Q4_1/Q8_0 blocks: measured 40/40
    ("int8", False, 0.85),  # requantized from the float weights: measured 36/40
])
def test_quantized_greedy_text_matches_float(float_answers, mode, gguf, at_least):
    model = tinyomni.load("smollm2")
    quantize_model(model.model, mode, gguf=gguf)
    answers = _greedy(model)
    same = sum(a == b for a, b in zip(answers, float_answers)) / len(QUESTIONS)
    differ = next(((a, b) for a, b in zip(answers, float_answers) if a != b), ([], []))
    assert same >= at_least, (f"{mode} (gguf={gguf}): {same:.0%} of answers identical to float32, e.g. "
                              f"{model.tokenizer.decode(differ[0])!r} for {model.tokenizer.decode(differ[1])!r}")


# --- the fused decode step -----------------------------------------------------------------------
def _odd_decoder(mode: str, bias: bool) -> torch.nn.Module:
    """A 2-layer decoder of awkward widths: hidden 80 (not a multiple of 32), head_dim 20 (not of 16),
    3 query heads per KV head, intermediate 136, quantized with the fused step installed."""
    from tinyomni.config import DecoderConfig
    from tinyomni.engine import fused
    from tinyomni.engine.quantize import quantize_module
    from tinyomni.model.decoder import Decoder

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=120, hidden_size=80, intermediate_size=136, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=20, attention_bias=bias,
                           max_position_embeddings=64)
    decoder = Decoder(config).eval()
    with torch.no_grad():
        for module in decoder.modules():  # non-trivial norms and biases, so a misplaced one shows
            if type(module).__name__ == "RMSNorm":
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
        decoder.model.embed_tokens.weight.normal_(0, 1.0)
    quantize_module(decoder, mode)
    fused.install(decoder)
    return decoder


def _decode(decoder, monkeypatch, fused_on: bool, dtype, serving: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill 3 left-padded prompts, then 4 decode steps; (every step's logits, the KV cache)."""
    from tinyomni.model.decoder import CacheState

    monkeypatch.setenv("TINYOMNI_FUSED_DECODE", "1" if fused_on else "0")
    decoder = decoder.to(dtype)
    B, T, steps = 3, 7, 4
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 120, (B, T), generator=gen)
    valid = torch.ones(B, T + steps, dtype=torch.bool)
    valid[1, :2] = valid[2, :5] = False  # rows 1 and 2 are shorter prompts, left-padded
    positions = (valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)
    # Serving: the batch lives in rows 4, 0, 2 of a 5-row cache, each row with its own slots.
    rows = torch.tensor([4, 0, 2]) if serving else None
    kv = decoder.new_cache(5 if serving else B, T + steps)
    out = []
    with torch.inference_mode():
        slots = torch.arange(T).expand(B, T) if serving else torch.arange(T)
        logits, _ = decoder(input_ids=ids, position_ids=positions, attention_mask=valid[:, :T],
                            cache=CacheState(kv, slots, T, rows=rows))
        out.append(logits[:, -1])
        for step in range(steps):
            slot = T + step
            tokens = torch.randint(0, 120, (B, 1), generator=gen)
            positions = positions[:, -1:] + 1
            slots = torch.full((B, 1), slot) if serving else torch.tensor([slot])
            logits, _ = decoder(input_ids=tokens, position_ids=positions, attention_mask=valid[:, :slot + 1],
                                cache=CacheState(kv, slots, slot + 1, rows=rows))
            out.append(logits[:, -1])
    return torch.stack(out).float(), torch.cat([kv.k, kv.v]).float()


@needs_kernels
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, serving", [(False, False), (True, True)])
def test_fused_decode_step_matches_the_layers(monkeypatch, mode, dtype, bias, serving):
    decoder = _odd_decoder(mode, bias)
    assert decoder.decode_step.why_not() == ""
    fused_logits, fused_cache = _decode(decoder, monkeypatch, True, dtype, serving)
    eager_logits, eager_cache = _decode(decoder, monkeypatch, False, dtype, serving)
    # The same arithmetic and rounding points; only summation orders differ (and, through them, an
    # activation code may round the other way now and then).
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for fused_t, eager_t in ((fused_logits, eager_logits), (fused_cache, eager_cache)):
        scale = eager_t.abs().max().item()
        assert (fused_t - eager_t).abs().max().item() <= tol * scale
    assert torch.equal(fused_logits[0], eager_logits[0])  # the prefill does not take the fused step
    assert torch.equal(fused_logits.argmax(-1), eager_logits.argmax(-1))


@needs_kernels
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("serving", [False, True])
def test_a_decode_step_is_one_call_from_token_ids_to_logits(monkeypatch, mode, dtype, serving):
    """quantize_model ties the token table to the head's blocks (QuantEmbedding): the fused step then
    also looks tokens up in those blocks and runs the final norm and the head, with the eager logits."""
    model = tinyomni.tiny_random_model(seed=0)
    quantize_model(model.model, mode, gguf=False)
    decoder = model.model.language_model
    assert isinstance(decoder.model.embed_tokens, QuantEmbedding)
    assert decoder.decode_step.why_not_logits() == ""
    whole, real = [], decoder.decode_logits

    def counted(*args):
        out = real(*args)
        whole.append(out is not None)
        return out

    decoder.decode_logits = counted
    fused_logits, fused_cache = _decode(decoder, monkeypatch, True, dtype, serving)
    assert whole == [True] * 4  # every decode step, and not the prefill
    eager_logits, eager_cache = _decode(decoder, monkeypatch, False, dtype, serving)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for fused_t, eager_t in ((fused_logits, eager_logits), (fused_cache, eager_cache)):
        assert (fused_t - eager_t).abs().max().item() <= tol * eager_t.abs().max().item()
    assert torch.equal(fused_logits.argmax(-1), eager_logits.argmax(-1))


@needs_kernels
def test_whole_steps_stay_eager_where_the_ends_differ(monkeypatch):
    """A float head (the layers fused, the head not) or LongRoPE tables: only the layers run fused."""
    decoder = _odd_decoder("int4", False)
    assert decoder.decode_step.why_not_logits() == ""
    decoder.lm_head = torch.nn.Linear(80, 120, bias=False)
    fused.install(decoder)
    assert decoder.decode_step.why_not() == ""
    assert "LM head" in decoder.decode_step.why_not_logits()
    fused_logits, _ = _decode(decoder, monkeypatch, True, torch.float32, False)
    eager_logits, _ = _decode(decoder, monkeypatch, False, torch.float32, False)
    assert (fused_logits - eager_logits).abs().max().item() <= 2e-3 * eager_logits.abs().max().item()
    decoder = _odd_decoder("int4", False)
    decoder.model.rotary_emb.long_from = 32
    fused.install(decoder)
    assert "LongRoPE" in decoder.decode_step.why_not_logits()


@needs_kernels
def test_fused_decode_step_steps_aside(monkeypatch):
    from tinyomni.model.decoder import CacheState

    decoder = _odd_decoder("int4", False)
    kv = decoder.new_cache(1, 8)
    x = torch.randn(1, 1, 80)
    cos, sin = decoder.model.rotary_emb(torch.tensor([[0]]), x.dtype)
    cache = CacheState(kv, torch.tensor([0]), 1)
    with torch.inference_mode():
        assert decoder.decode_step(x, cos, sin, None, cache) is not None
        use_reference(True)  # the reference kernels run the layers themselves
        assert decoder.decode_step(x, cos, sin, None, cache) is None
        use_reference(False)
        monkeypatch.setenv("TINYOMNI_FUSED_DECODE", "0")
        assert decoder.decode_step(x, cos, sin, None, cache) is None
    assert decoder.decode_step(x, cos, sin, None, cache) is None  # autograd on: not fused
    plain = tinyomni.tiny_random_model(seed=0).model.language_model
    plain.model.layers[0].mlp.up_proj = QuantLinear("int4", *int4_ref.quantize(torch.randn(128, 64)), None, 64, 128)
    from tinyomni.engine import fused

    fused.install(plain)
    assert "not quantized" in plain.decode_step.why_not()
