"""A LoRA adapter kept apart over quantized blocks (engine/lora.py): it computes the float adapted
layer, the fused decode step adds it as the eager layers do, and the load cache and quantized
checkpoints store it apart (quantization.json's "lora"), so a GGUF base keeps the file's 4-bit blocks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_quant import _decode
from torch import nn

import tinyomni
from tinyomni.engine import fused, ops, quantize_module
from tinyomni.engine.lora import LoRAQuantLinear
from tinyomni.engine.quantize import dequantize_blocks, quantize_weight, to_linear
from tinyomni.errors import CheckpointError
from tinyomni.model.lora import LoraConfig, LoRALinear, apply_lora, lora_modules

needs_kernels = pytest.mark.skipif(not ops.has_extension(), reason=f"C++ kernels unavailable: {ops.kernel_path()}")


def _randomize_adapters(model: nn.Module, scale: float = 0.05) -> None:
    """LoRA B starts at zero; a trained adapter's is not (else every test here would pass vacuously)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * scale)


def _file_like_layer(out_features: int = 40, in_features: int = 96) -> tuple[nn.Module, dict]:
    """An adapted linear whose base weight is exactly some int4 blocks (as a GGUF base's is)."""
    torch.manual_seed(1)
    blocks = quantize_weight(torch.randn(out_features, in_features), "int4")
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(dequantize_blocks(blocks))
    model = nn.Sequential(LoRALinear.wrap(linear, LoraConfig(r=4, alpha=8)))
    _randomize_adapters(model, scale=0.2)
    return model.eval(), {"0": blocks}


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_the_side_path_is_the_float_adapted_layer_over_the_files_blocks(mode):
    model, blocks = _file_like_layer()
    adapted = model[0]
    x = torch.randn(5, 96)
    with torch.no_grad():
        want = adapted(x)
        merged = adapted.merged()
        requantized = to_linear(quantize_weight(merged.weight, mode), merged.bias)(x)  # the old way
        assert quantize_module(model, mode, blocks) == 1
        layer = model[0]
        assert isinstance(layer, LoRAQuantLinear) and layer.kind == mode and layer.r == 4
        if mode == "int4":  # the file's blocks, untouched
            file_layer = to_linear(blocks["0"])
            assert torch.equal(layer.qweight, file_layer.qweight) and torch.equal(layer.scales, file_layer.scales)
        got = layer(x)
    error = ((got - want).norm() / want.norm()).item()
    old_error = ((requantized - want).norm() / want.norm()).item()
    assert error < 1e-3, error  # only the activations' ~16-bit quantization
    if mode == "int4":
        assert error < old_error / 10, (error, old_error)  # merging and requantizing rounds the sum again
    assert torch.allclose(layer.merged_weight(), merged.weight, atol=1e-5)


def _adapted_decoder(mode: str, bias: bool) -> nn.Module:
    """test_quant's awkward 2-layer decoder with a rank-4 adapter on all seven projections."""
    from tinyomni.config import DecoderConfig
    from tinyomni.model.decoder import Decoder

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=120, hidden_size=80, intermediate_size=136, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=20, attention_bias=bias,
                           max_position_embeddings=64)
    decoder = Decoder(config).eval()
    with torch.no_grad():
        for module in decoder.modules():
            if type(module).__name__ == "RMSNorm":
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
        decoder.model.embed_tokens.weight.normal_(0, 1.0)
    assert len(apply_lora(decoder, LoraConfig(r=4, alpha=8, scope=""))) == 14
    _randomize_adapters(decoder, scale=0.3)
    assert quantize_module(decoder, mode) == 15  # 14 adapted projections and the LM head
    fused.install(decoder)
    return decoder


@needs_kernels
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, serving", [(False, False), (True, True)])
def test_fused_decode_step_adds_the_adapter_as_the_layers_do(monkeypatch, mode, dtype, bias, serving):
    decoder = _adapted_decoder(mode, bias)
    assert decoder.decode_step.why_not() == ""
    fused_logits, fused_cache = _decode(decoder, monkeypatch, True, dtype, serving)
    eager_logits, eager_cache = _decode(decoder, monkeypatch, False, dtype, serving)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for fused_t, eager_t in ((fused_logits, eager_logits), (fused_cache, eager_cache)):
        assert (fused_t - eager_t).abs().max().item() <= tol * eager_t.abs().max().item()
    assert torch.equal(fused_logits.argmax(-1), eager_logits.argmax(-1))
    # ... and the adapter matters here: without it the fused step fails the comparison above.
    for layer in decoder.model.layers:
        layer.self_attn.v_proj.lora_B.zero_()
    decoder.decode_step._stack = None  # rebuilt from the zeroed adapter
    without, _ = _decode(decoder, monkeypatch, True, dtype, serving)
    assert (without - fused_logits).abs().max().item() > tol * eager_logits.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_on_the_lm_head_joins_the_whole_fused_step(monkeypatch, dtype):
    from tinyomni.config import DecoderConfig
    from tinyomni.model.decoder import Decoder

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    decoder = Decoder(config).eval()
    assert len(apply_lora(decoder, LoraConfig(r=4, alpha=8, scope="", targets=["q_proj", "lm_head"]))) == 3
    _randomize_adapters(decoder, scale=0.3)
    quantize_module(decoder, "int4")
    fused.install(decoder)
    assert isinstance(decoder.lm_head, LoRAQuantLinear)
    assert decoder.decode_step.why_not_logits() == ""
    fused_logits, _ = _decode(decoder, monkeypatch, True, dtype, False)
    eager_logits, _ = _decode(decoder, monkeypatch, False, dtype, False)
    tol = (2e-3 if dtype == torch.float32 else 3e-2) * eager_logits.abs().max().item()
    assert (fused_logits - eager_logits).abs().max().item() <= tol
    decoder.lm_head.lora_B.zero_()
    decoder.decode_step._stack = None  # rebuilt without the head's update
    without, _ = _decode(decoder, monkeypatch, True, dtype, False)
    assert (without - fused_logits).abs().max().item() > tol


@pytest.fixture
def adapted_checkpoint(tmp_path):
    """A tiny model with a LoRA adapter on its decoder, saved (the adapter apart, as training saves it)."""
    model = tinyomni.tiny_random_model(seed=0)
    apply_lora(model.model, LoraConfig(r=4, alpha=8))
    _randomize_adapters(model.model)
    return model.save(tmp_path / "adapted")


def _logits(model: tinyomni.Model) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.inference_mode():
        return model.model.language_model(input_ids=ids)[0]


def _adapters(model: tinyomni.Model) -> dict[str, LoRAQuantLinear]:
    return {n: m for n, m in model.model.named_modules() if isinstance(m, LoRAQuantLinear)}


def test_load_cache_and_quantized_checkpoint_keep_the_adapter_apart(adapted_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYOMNI_CACHE", str(tmp_path / "cache"))
    built = tinyomni.load(adapted_checkpoint, quantize="int4")
    assert len(_adapters(built)) == 14 and built.quantization == "int4"
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    spec = json.loads((entry / "quantization.json").read_text())
    assert spec["version"] == 2
    assert spec["linears"]["language_model.model.layers.0.mlp.up_proj"]["lora"] == {"r": 4, "scaling": 2.0}
    cached = tinyomni.load(adapted_checkpoint, quantize="int4")  # read from the entry
    assert set(_adapters(cached)) == set(_adapters(built))
    assert torch.equal(_logits(cached), _logits(built))
    # A quantized checkpoint of it: the same layers, the same logits.
    saved = tinyomni.load(built.save(tmp_path / "q4"))
    assert set(_adapters(saved)) == set(_adapters(built)) and torch.equal(_logits(saved), _logits(built))
    # Against the float model (adapter merged): only int4's rounding of the tiny random base apart.
    float_logits = _logits(tinyomni.load(adapted_checkpoint))
    assert ((_logits(built) - float_logits).norm() / float_logits.norm()).item() < 0.2


def _edit(path, edit) -> None:
    spec = json.loads((path / "quantization.json").read_text())
    edit(spec)
    (path / "quantization.json").write_text(json.dumps(spec))


def test_bad_adapter_entries_are_refused_by_name(adapted_checkpoint, tmp_path):
    quantized = tinyomni.load(adapted_checkpoint, quantize="int8").save(tmp_path / "q8")
    name = "language_model.model.layers.1.self_attn.k_proj"
    _edit(quantized, lambda s: s["linears"][name]["lora"].update(r=3))
    with pytest.raises(CheckpointError, match=rf"{name}.lora_A is .* rank-3 adapter"):
        tinyomni.load(quantized)
    _edit(quantized, lambda s: s["linears"][name].update(lora={"r": "four"}))
    with pytest.raises(CheckpointError, match=rf"{name}.lora must be"):
        tinyomni.load(quantized)
    _edit(quantized, lambda s: (s["linears"][name].update(lora={"r": 4, "scaling": 2.0}), s.update(version=1)))
    with pytest.raises(CheckpointError, match="version 2 file"):  # version 1 had no adapters
        tinyomni.load(quantized)


def test_a_version_1_checkpoint_without_adapters_still_loads(tmp_path):
    model = tinyomni.tiny_random_model(seed=0)
    tinyomni.api._quantize(model, "int4")
    path = model.save(tmp_path / "v1")
    _edit(path, lambda s: s.update(version=1))
    assert torch.equal(_logits(tinyomni.load(path)), _logits(model))


# --- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
@needs_kernels
def test_tinyomni_world_runs_in_4_bits_over_the_gguf_blocks(caplog):
    with caplog.at_level(logging.WARNING, logger="tinyomni.engine.quantize"):
        model = tinyomni.load("tinyomni-world", quantize="int4")
    assert not [r for r in caplog.records if "differ from" in r.getMessage()]  # no int8 fallback any more
    layers = model.model.language_model.model.layers
    assert all(isinstance(layer.get_submodule(p), LoRAQuantLinear) and layer.get_submodule(p).kind == "int4"
               for layer in layers for p in fused.PROJECTIONS)
    assert model.model.language_model.decode_step.why_not() == ""
    answer = model.chat("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer, answer
