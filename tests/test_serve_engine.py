"""The continuous-batching engine: a request's answer in a batch equals its answer alone (greedy and
seeded sampling), rows are freed on finish and on cancel, the queue is bounded, context is enforced."""

from __future__ import annotations

import time

import pytest
from serve_support import png_bytes, torch_threads, varied_tiny_model, wav_bytes

from tinyomni.errors import ContextLengthError, InputError
from tinyomni.generate import SamplingParams
from tinyomni.serve.engine import Engine, QueueFullError, RequestCancelled

CONVERSATIONS = [
    "hi",
    "Tell me a story about a cat who learned to fly over the mountains.",
    [{"role": "user", "content": [{"type": "image", "image": png_bytes((200, 30, 30))},
                                  {"type": "text", "text": "What colour is this?"}]}],
    [{"role": "user", "content": [{"type": "audio", "audio": wav_bytes(0.7)},
                                  {"type": "text", "text": "What did you hear?"}]}],
    [{"role": "user", "content": [{"type": "image", "image": png_bytes((10, 200, 30), (80, 40))},
                                  {"type": "image", "image": png_bytes((10, 30, 200), (40, 80))},
                                  {"type": "text", "text": "Compare them."}]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Scattering."}, {"role": "user", "content": "Say more."}],
]


@pytest.fixture(scope="module")
def model():
    with torch_threads(1):
        yield varied_tiny_model()


def run_alone(model, conversation, params):
    """The reference: the core's static generation (not the engine)."""
    fields = dict(max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=params.seed,
                  stop=list(params.stop), top_k=params.top_k, top_p=params.top_p,
                  repetition_penalty=params.repetition_penalty)
    return model.complete(conversation, **fields)


def run_engine(model, jobs, max_batch):
    """Submit all (conversation, params) jobs at once; collect each one's completion."""
    engine = Engine(model, max_batch=max_batch).start()
    try:
        requests = [engine.submit(model.prepare(c), p) for c, p in jobs]
        texts = ["".join(r) for r in requests]
        assert engine.stats()["active"] == 0
        return [r.completion for r in requests], texts, engine.steps
    finally:
        engine.close()


@pytest.mark.parametrize("max_batch", [3, 8])
def test_batched_greedy_equals_alone(model, max_batch):
    # Different lengths and budgets, so rows finish and get refilled mid-batch (max_batch=3).
    jobs = [(c, SamplingParams(max_new_tokens=12 + 5 * i)) for i, c in enumerate(CONVERSATIONS)]
    expected = [run_alone(model, c, p) for c, p in jobs]
    completions, texts, steps = run_engine(model, jobs, max_batch)
    for got, text, want in zip(completions, texts, expected):
        assert got.token_ids == want.token_ids
        assert text == got.text == want.text
        assert (got.prompt_tokens, got.completion_tokens, got.finish_reason) == \
               (want.prompt_tokens, want.completion_tokens, want.finish_reason)
    # Shared steps: far fewer decode steps than tokens generated one request at a time.
    assert steps < sum(c.completion_tokens for c in completions) * 0.7


def test_batched_sampling_with_seed_equals_alone(model):
    jobs = [(c, SamplingParams(max_new_tokens=15, temperature=0.9, top_p=0.95, top_k=50, seed=i,
                               repetition_penalty=1.1 if i % 2 else 1.0))
            for i, c in enumerate(CONVERSATIONS)]
    expected = [run_alone(model, c, p) for c, p in jobs]
    completions, _, _ = run_engine(model, jobs, max_batch=4)
    assert [c.token_ids for c in completions] == [e.token_ids for e in expected]


def test_stop_string_cuts_the_answer(model):
    full = run_alone(model, "hi", SamplingParams(max_new_tokens=20))
    stop = full.text[len(full.text) // 2:][:4]
    expected = run_alone(model, "hi", SamplingParams(max_new_tokens=20, stop=[stop]))
    completions, texts, _ = run_engine(model, [("hi", SamplingParams(max_new_tokens=20, stop=[stop]))], 2)
    assert completions[0].finish_reason == expected.finish_reason == "stop"
    assert texts[0] == completions[0].text == expected.text
    assert stop not in texts[0]


def test_cancel_frees_the_row(model):
    engine = Engine(model, max_batch=1).start()
    try:
        long = engine.submit(model.prepare("hi"), SamplingParams(max_new_tokens=1500))
        stream = iter(long)
        next(stream)
        long.cancel()
        with pytest.raises(RequestCancelled):
            list(stream)
        # The single row is free again: a new request runs to completion.
        short = engine.submit(model.prepare("hello"), SamplingParams(max_new_tokens=5))
        assert "".join(short) == short.completion.text
        assert short.completion.completion_tokens == 5
        assert engine.stats()["active"] == 0
        assert engine.stats()["tokens"] < 200  # the long request stopped early
    finally:
        engine.close()


def test_queue_is_bounded(model):
    engine = Engine(model, max_batch=1, max_queue=1).start()
    try:
        accepted = []
        with pytest.raises(QueueFullError, match="busy"):
            for _ in range(4):
                accepted.append(engine.submit(model.prepare("hi"), SamplingParams(max_new_tokens=1500)))
        assert 1 <= len(accepted) <= 2
        for request in accepted:
            request.cancel()
        deadline = time.monotonic() + 10
        while engine.stats()["active"] or engine.stats()["waiting"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.close()


def test_context_limits(model):
    engine = Engine(model, max_batch=2, max_context=48).start()
    try:
        with pytest.raises(ContextLengthError, match="48 tokens"):
            engine.submit(model.prepare("word " * 60), SamplingParams())
        with pytest.raises(InputError):
            engine.submit(model.prepare("hi"), SamplingParams(temperature=-1))
        request = engine.submit(model.prepare("hi"), SamplingParams(max_new_tokens=500))
        list(request)
        c = request.completion
        assert c.finish_reason == "length" and c.prompt_tokens + c.completion_tokens == 48
    finally:
        engine.close()
