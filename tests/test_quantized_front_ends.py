"""`quantize=` reaches every front end: the API, the CLI's --quantize, and the serving engine (and a
saved quantized checkpoint, tests/test_quantized_checkpoint.py, reaches them through --model)."""

from __future__ import annotations

import pytest
import torch

import tinyomni
from tinyomni.engine import QuantLinear
from tinyomni.errors import InputError
from tinyomni.generate import SamplingParams
from tinyomni.serve.engine import Engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tinyomni.tiny_random_model(seed=2)
    generator = torch.Generator().manual_seed(0)  # the same weights whatever ran before
    with torch.no_grad():  # larger weights, so answers differ by prompt (as serve_support does)
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.save(tmp_path_factory.mktemp("q") / "ckpt")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_load_quantizes_the_decoder_and_it_still_answers(checkpoint, mode):
    model = tinyomni.load(checkpoint, quantize=mode)
    assert model.quantization == mode
    linears = [m for m in model.model.language_model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.kind == mode for m in linears)
    assert not any(type(m) is torch.nn.Linear for m in model.model.language_model.modules())
    float_model = tinyomni.load(checkpoint)
    assert model.complete("hello", max_new_tokens=8, max_repeat_tokens=0).completion_tokens == 8
    ids = torch.tensor([model.prepare("hello there, how are you").input_ids])
    with torch.no_grad():
        got, want = model.model(ids)[0], float_model.model(ids)[0]
    # Random weights are the worst case for 4 bits (the greedy-text checks on SmolLM2 are in test_quant.py);
    # measured: int8 0.028, int4 0.45 relative error on this model.
    assert ((got - want).norm() / want.norm()).item() < (0.05 if mode == "int8" else 0.6)


def test_a_quantized_model_saves_only_whole_and_bad_modes_are_named(checkpoint, tmp_path):
    model = tinyomni.load(checkpoint, quantize="int4")
    with pytest.raises(InputError, match="quantized"):  # its decoder is what was quantized: it must be stored
        model.save(tmp_path / "q", store_decoder=False)
    assert tinyomni.load(model.save(tmp_path / "q")).quantization == "int4"  # tests/test_quantized_checkpoint.py
    with pytest.raises(InputError, match="int3"):
        tinyomni.load(checkpoint, quantize="int3")


def test_the_serving_engine_runs_quantized_models(checkpoint):
    model = tinyomni.load(checkpoint, quantize="int8")
    engine = Engine(model, max_batch=2).start()
    try:
        params = SamplingParams(max_new_tokens=6, max_repeat_tokens=0)
        request = engine.submit(model.prepare("hello"), params)
        assert "".join(request) == model.complete("hello", max_new_tokens=6, max_repeat_tokens=0).text  # same kernels
    finally:
        engine.close()


def test_cli_quantize_flag(checkpoint, capsys):
    from tinyomni.cli import main

    assert main(["chat", "--model", str(checkpoint), "--quantize", "int4", "--max-new-tokens", "4", "hi"]) == 0


def test_serve_and_eval_load_a_saved_quantized_checkpoint(checkpoint, tmp_path, capsys):
    """--model DIR of a quantized checkpoint: the server's engine and `tinyomni eval` read it as it is."""
    from tinyomni.cli import main

    saved = tinyomni.load(checkpoint, quantize="int4").save(tmp_path / "int4")
    model = tinyomni.load(saved)
    engine = Engine(model, max_batch=2).start()
    try:
        params = SamplingParams(max_new_tokens=4, max_repeat_tokens=0)
        assert "".join(engine.submit(model.prepare("hello"), params)) == \
            model.complete("hello", max_new_tokens=4, max_repeat_tokens=0).text
    finally:
        engine.close()
    task = tmp_path / "task.jsonl"
    task.write_text('{"id": "q1", "question": "What is 2+2?", "answers": ["4"]}\n')
    assert main(["eval", "run", str(task), "--model", str(saved), "--out", str(tmp_path / "eval"),
                 "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()
