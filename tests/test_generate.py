"""Sampling, stopping and streaming behave as documented."""

from __future__ import annotations

import pytest
import torch

from tinyomni.errors import InputError
from tinyomni.generate import SamplingParams, TextStream, sample


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    logits = torch.randn(4, 50)
    greedy = sample(logits, SamplingParams(), None)
    assert torch.equal(greedy, logits.argmax(-1))
    topk1 = sample(logits, SamplingParams(temperature=1.0, top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(topk1, greedy)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), generator).item() for _ in range(300)}
    assert picks == {0, 1}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    history = torch.tensor([[0]])
    assert sample(logits, SamplingParams(repetition_penalty=1.5), None, history).item() == 1


def test_seed_makes_sampling_reproducible(smollm2):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=123)
    first = smollm2.chat("Tell me a story.", **kwargs)
    assert smollm2.chat("Tell me a story.", **kwargs) == first


def test_stop_strings_cut_the_answer(smollm2):
    completion = smollm2.complete("Count from 1 to 10, separated by commas.", max_new_tokens=40, stop=["5"])
    assert completion.finish_reason == "stop"
    assert "5" not in completion.text and "4" in completion.text


def test_max_new_tokens_ends_with_length(smollm2):
    completion = smollm2.complete("Write a long poem about the sea.", max_new_tokens=5)
    assert completion.finish_reason == "length" and completion.completion_tokens == 5


def test_text_stream_never_splits_a_character(smollm2):
    tokenizer = smollm2.tokenizer
    text = "naïve 🙂 東京 done"
    stream = TextStream(tokenizer, stop=[])
    deltas = [stream.add(t) for t in tokenizer.encode(text)] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_holds_back_a_possible_stop_string(smollm2):
    tokenizer = smollm2.tokenizer
    stream = TextStream(tokenizer, stop=["END!"])
    out = "".join(stream.add(t) for t in tokenizer.encode("hello END!")) + stream.finish()
    assert out == "hello " and stream.stopped


def test_bad_sampling_options_are_clear_errors(tiny):
    with pytest.raises(InputError, match="temperature"):
        tiny.chat("hi", temperature=-1)
    with pytest.raises(InputError, match="unknown sampling option"):
        tiny.chat("hi", temprature=0.5)
