"""`encoder_dtype` (load, and --encoder-dtype on chat/serve/eval): bfloat16 towers and projectors in
front of a float32 decoder, their outputs cast where they enter it; `tinyomni info` says so, and which
of the engine's paths a quantized decoder takes."""

from __future__ import annotations

import torch

import tinyomni
from tinyomni.cli import build_parser


def test_bf16_encoders_feed_a_float32_decoder(media):
    model = tinyomni.tiny_random_model(seed=0)
    ask = [{"role": "user", "content": [{"type": "image", "image": media["red.png"]},
                                        {"type": "audio", "audio": media["tone.wav"]},
                                        {"type": "text", "text": "What is it?"}]}]
    prompt = model.prepare(ask)
    inner = model.model
    inner.media_cache = None
    with torch.inference_mode():
        want = inner.embed(torch.tensor([prompt.input_ids]), prompt.pixel_values, prompt.audio_features)
        model.cast_encoders("bfloat16")
        got = inner.embed(torch.tensor([prompt.input_ids]), prompt.pixel_values, prompt.audio_features)
    for part in (inner.vision_tower, inner.multi_modal_projector, inner.audio_tower, inner.audio_projector):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in inner.language_model.parameters()} == {torch.float32}
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bf16's rounding, nothing else
    assert model.complete(ask, max_new_tokens=2).completion_tokens >= 1


def test_the_command_line_takes_it():
    parser = build_parser()  # every command's options
    for command in (["chat", "hi"], ["serve"], ["eval", "run", "world-bench"]):
        assert parser.parse_args([*command, "--encoder-dtype", "bfloat16"]).encoder_dtype == "bfloat16"
        assert parser.parse_args(command).encoder_dtype is None


def test_info_says_which_engine_paths_run_and_the_encoders_dtype():
    model = tinyomni.tiny_random_model(seed=0)
    assert "engine" not in model.info() and "encoder_dtype" not in model.info()
    from tinyomni.engine import ops, quantize_model

    quantize_model(model.model, "int4", gguf=False)
    model.quantization = "int4"
    model.cast_encoders("bfloat16")
    facts = model.info()
    assert facts["encoder_dtype"] == "bfloat16"
    engine = facts["engine"]
    assert engine["kernels"] == ops.kernel_path() and engine["prefill"] == ops.prefill_path()
    if ops.using_extension():
        assert engine["decode step"] == "one C++ call a token, ids to logits"
    else:
        assert engine["decode step"].startswith("layer by layer")


def test_info_works_for_every_decoder_kind():
    """OPT (BLIP-2) and Phi decoders name their final norm otherwise; info() must not assume a Llama."""
    import copy

    from tinyomni import api
    from tinyomni.model.omni import OmniModel

    base = tinyomni.tiny_random_model(seed=0)
    for kind in ("opt", "phi"):
        config = copy.deepcopy(base.config)
        config.decoder.kind = kind
        model = api.Model(OmniModel(config), base.tokenizer).cast_encoders("bfloat16")
        facts = model.info()
        assert (facts["dtype"], facts["encoder_dtype"]) == ("float32", "bfloat16")
