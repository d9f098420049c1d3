"""The serving engine prefills waiting requests together: one decoder forward over right-padded
prompts, into their own cache rows. Each row's logits and greedy answer equal its solo run (float32
and int4), a request that fails in prefill fails alone and frees its row, and the groups stay
within their token budget."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from serve_support import png_bytes, torch_threads, varied_tiny_model, wav_bytes

from tinyomni.engine import quantize_model
from tinyomni.errors import InputError
from tinyomni.generate import SamplingParams
from tinyomni.serve import engine as engine_module
from tinyomni.serve.engine import Engine, prefill_groups

# Different lengths (1 to ~90 tokens), text, an image and audio: the padding differs per row.
CONVERSATIONS = [
    "hi",
    "Tell me a long story about a cat who learned to fly over the snowy mountains at night.",
    [{"role": "user", "content": [{"type": "image", "image": png_bytes((200, 30, 30))},
                                  {"type": "text", "text": "What colour is this?"}]}],
    [{"role": "user", "content": [{"type": "audio", "audio": wav_bytes(0.7)},
                                  {"type": "text", "text": "What did you hear?"}]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Scattering."}, {"role": "user", "content": "Say more."}],
]
POISON = 1234.5  # an embedding value no real prompt has: marks the request whose decoder forward fails


@pytest.fixture(scope="module", params=["float32", "int4"])
def model(request):
    with torch_threads(1):
        model = varied_tiny_model()
        if request.param == "int4":
            quantize_model(model.model, "int4", gguf=False)
        yield model


def gated_engine(model, max_batch: int) -> tuple[Engine, threading.Event]:
    """An engine whose loop waits for `gate` before its first admission, so that every request
    submitted before `gate.set()` is waiting when the loop first looks (one prefill group)."""
    engine = Engine(model, max_batch=max_batch)
    gate = threading.Event()
    admit = engine._admit

    def gated_admit() -> None:
        gate.wait()
        admit()

    engine._admit = gated_admit
    return engine, gate


class DecoderSpy:
    """Wraps the decoder's `hidden_states`: records the batch size of every multi-token forward (a
    prefill), and fails any forward whose input holds a POISON row (a request that breaks it)."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.prefill_sizes: list[int] = []
        decoder.hidden_states = self

    def __call__(self, x, *args, **kwargs):
        if x.shape[1] > 1:
            self.prefill_sizes.append(x.shape[0])
        if (x == POISON).all(-1).any():
            raise RuntimeError("simulated failure inside the decoder")
        return type(self.decoder).hidden_states(self.decoder, x, *args, **kwargs)


@pytest.fixture
def spy(model):
    spy = DecoderSpy(model.model.language_model)
    yield spy
    del spy.decoder.hidden_states  # the class's method again


def test_batched_prefill_logits_equal_solo(model):
    prompts = [model.prepare(c) for c in CONVERSATIONS]
    lengths = [len(p.input_ids) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # every row padded differently
    engine = Engine(model, max_batch=8)
    engine._kv = engine._decoder.new_cache(8, 256)  # what start() allocates, without the thread
    # float32: only the batched matmuls' summation order differs; int4: the kernels quantize and sum
    # activation tiles whose grouping depends on the batch's row count (~1e-4 on these logits).
    tolerance = 1e-4 if model.model.language_model.decode_step is None else 1e-3
    with torch.inference_mode():
        requests = [engine_module.Request(p, SamplingParams(), 8) for p in prompts]
        group = [(r, engine._embed(r)) for r in requests]
        rows = [6, 0, 3, 5, 1]  # any free rows, in any order
        batched = engine._prefill_rows(group, rows)
        for b, p in enumerate(prompts):
            solo, _ = model.model(
                torch.tensor([p.input_ids]), pixel_values=p.pixel_values, audio_features=p.audio_features,
                logits_to_keep=1)
            torch.testing.assert_close(batched[b], solo[0, -1], rtol=tolerance, atol=tolerance)
            # The row's cache holds the prompt's keys where decode will read them (slots 0..n-1).
            kv = engine._decoder.new_cache(1, 256)
            engine._decoder(inputs_embeds=group[b][1][None],
                            cache=engine_module.CacheState(kv, torch.arange(lengths[b]), lengths[b]))
            torch.testing.assert_close(engine._kv.k[:, rows[b], :, :lengths[b]], kv.k[:, 0, :, :lengths[b]],
                                       rtol=1e-4, atol=1e-4)


def complete_alone(model, conversation, params: SamplingParams):
    return model.complete(conversation, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                          seed=params.seed)


def drain(request, timeout: float = 60) -> str:
    """The request's whole text (or its error), failing the test instead of hanging on a lost request."""
    result: list = []

    def read() -> None:
        try:
            result.append("".join(request))
        except Exception as e:
            result.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"request {request.id} got no answer and no error within {timeout} s"
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def jobs_and_answers(model):
    prompts = [model.prepare(c) for c in CONVERSATIONS]
    jobs = [(c, p, SamplingParams(max_new_tokens=10 + 3 * i)) for i, (c, p) in enumerate(zip(CONVERSATIONS, prompts))]
    jobs.append((CONVERSATIONS[1], prompts[1], SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)))
    return prompts, jobs, [complete_alone(model, c, s) for c, _, s in jobs]


def check_answers(requests, expected) -> None:
    for request, want in zip(requests, expected):
        assert drain(request) == want.text
        assert request.completion.token_ids == want.token_ids
        assert request.completion.prompt_tokens == want.prompt_tokens


def test_requests_prefilled_together_answer_as_alone(model, spy):
    prompts, jobs, expected = jobs_and_answers(model)
    # Image placeholders without the image: its embedding fails, before the shared forward.
    no_image = dataclasses.replace(prompts[2], pixel_values=None)
    spy.prefill_sizes.clear()  # the reference runs above went through it too
    engine, gate = gated_engine(model, max_batch=8)
    engine.start()
    try:
        requests = [engine.submit(p, s) for _, p, s in jobs[:3]]
        bad = engine.submit(no_image, SamplingParams())
        requests += [engine.submit(p, s) for _, p, s in jobs[3:]]
        gate.set()
        with pytest.raises(InputError, match="image placeholder"):
            drain(bad)
        check_answers(requests, expected)
        assert spy.prefill_sizes == [len(jobs)]  # one forward prefilled every prompt of every length
        assert engine.stats()["active"] == 0 and engine.stats()["prefills"] == 1
    finally:
        engine.close()


def test_a_failing_shared_prefill_is_redone_alone_and_fails_only_its_culprit(model, spy):
    prompts, jobs, expected = jobs_and_answers(model)
    poisoned = model.prepare("this one breaks the decoder")
    spy.prefill_sizes.clear()
    engine, gate = gated_engine(model, max_batch=8)
    embed = engine._embed
    engine._embed = lambda r: embed(r).fill_(POISON) if r.prompt is poisoned else embed(r)
    engine.start()
    try:
        requests = [engine.submit(p, s) for _, p, s in jobs[:3]]
        bad = engine.submit(poisoned, SamplingParams())
        requests += [engine.submit(p, s) for _, p, s in jobs[3:]]
        gate.set()
        with pytest.raises(RuntimeError, match="simulated"):
            drain(bad)
        check_answers(requests, expected)
        # The shared forward of all 7 failed; then each was prefilled alone.
        assert spy.prefill_sizes == [7] + [1] * 7
        assert engine.stats()["active"] == 0  # every row was freed, the failed one's included
        after = engine.submit(prompts[0], SamplingParams(max_new_tokens=5))
        drain(after)
        assert after.completion.token_ids == expected[0].token_ids[:5]
    finally:
        engine.close()


def test_one_prefill_serves_every_waiting_request(model, spy):
    prompts = [model.prepare(c) for c in CONVERSATIONS]
    engine, gate = gated_engine(model, max_batch=3)
    sizes = spy.prefill_sizes
    engine.start()
    try:
        requests = [engine.submit(p, SamplingParams(max_new_tokens=4)) for p in prompts]
        gate.set()
        for request in requests:
            drain(request)
        # Three free rows: three requests together, the other two together once rows free up.
        assert sizes[0] == 3 and sum(sizes) == len(prompts)
        assert engine.stats()["active"] == 0
    finally:
        engine.close()


def test_prefill_groups_keep_order_and_budget():
    items = [(i, torch.zeros(n, 1)) for i, n in enumerate([10, 30, 20, 100, 5, 5])]
    groups = prefill_groups(items, budget=100)
    assert [[i for i, _ in g] for g in groups] == [[0, 1, 2], [3], [4, 5]]
    for g in groups:
        assert len(g) == 1 or len(g) * max(len(e) for _, e in g) <= 100
    assert [len(g) for g in prefill_groups(items, budget=10**6)] == [6]
    assert [len(g) for g in prefill_groups(items[3:4], budget=1)] == [1]  # a long prompt runs alone


def test_a_visual_expert_model_is_served_as_it_answers_alone():
    """The batched prefill tells a visual-expert decoder where each row's image tokens are (padding is no
    token), so an image prompt and text prompts prefilled together answer as each does alone."""
    from tinyomni.model.visual_expert import add_visual_expert, is_expert_weight

    with torch_threads(1):
        model = varied_tiny_model()
        add_visual_expert(model.model)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # experts away from the text weights, so a missing mask would show
            for name, p in model.model.named_parameters():
                if is_expert_weight(name):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        chosen = [CONVERSATIONS[2], CONVERSATIONS[0], CONVERSATIONS[1]]
        params = SamplingParams(max_new_tokens=8)
        expected = [complete_alone(model, c, params) for c in chosen]
        engine, gate = gated_engine(model, max_batch=4)
        engine.start()
        try:
            requests = [engine.submit(model.prepare(c), params) for c in chosen]
            gate.set()
            check_answers(requests, expected)
            assert engine.prefills == 1
        finally:
            engine.close()
