"""Text generation: prefill the prompt once, then decode token by token from the KV cache.

Sampling (greedy, temperature, top-k, top-p, repetition penalty, seed), stopping (end-of-turn ids,
stop strings, max_new_tokens, the context length) and UTF-8-safe streaming of text deltas. A batch
of prompts is left-padded so every row writes the same cache slot at each step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinyomni.errors import ContextLengthError, InputError
from tinyomni.model.decoder import CacheState
from tinyomni.model.omni import OmniModel
from tinyomni.processing.chat import Prompt
from tinyomni.processing.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the prompt or answer
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # keep going past end-of-turn (benchmarks want a fixed length)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise InputError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InputError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InputError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise InputError("repetition_penalty must be > 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError("stop must be a list of non-empty strings")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    token_ids: list[int] = field(default_factory=list)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           history: Tensor | None = None) -> Tensor:
    """Pick the next token for each row from float logits [B, V]."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStream:
    """Turns a growing list of token ids into text deltas that are safe to show.

    Holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could be the
    start of a stop string; cuts the text at the first stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.emitted = 0  # characters already yielded
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                text = text[:at]
        self.text = text
        safe = len(text)
        if not self.stopped:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for s in self.stop:  # a tail that may grow into a stop string waits
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        return self._emit(safe)

    def finish(self) -> str:
        """Whatever was held back, once no more tokens come."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta


class Generation:
    """One generate call over a batch of prompts. Iterate it for (row, text delta) pairs; afterwards
    `completions` holds each row's full result."""

    def __init__(self, model: OmniModel, tokenizer: Tokenizer, prompts: list[Prompt],
                 params: SamplingParams, suppress_ids: Sequence[int] = ()) -> None:
        params.validate()
        if not prompts:
            raise InputError("no prompts to generate from")
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.params = params
        self.suppress_ids = list(suppress_ids)
        context = model.config.decoder.max_position_embeddings
        longest = max(len(p.input_ids) for p in prompts)
        if longest >= context:
            raise ContextLengthError(
                f"the prompt is {longest} tokens (media placeholders included) but the model's context is "
                f"{context} tokens; shorten the text, use fewer images/tiles or shorter audio")
        self.max_new_tokens = min(params.max_new_tokens, context - longest)
        self.completions: list[Completion] = []

    def __iter__(self) -> Iterator[tuple[int, str]]:
        with torch.inference_mode():
            yield from self._run()

    def _run(self) -> Iterator[tuple[int, str]]:
        model, params = self.model, self.params
        decoder = model.language_model
        device = decoder.model.embed_tokens.weight.device
        B = len(self.prompts)
        lengths = [len(p.input_ids) for p in self.prompts]
        T = max(lengths)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (T - n) + p.input_ids for p, n in zip(self.prompts, lengths)],
                                 device=device)
        padded = any(n != T for n in lengths)
        max_len = T + self.max_new_tokens
        key_valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
        for row, n in enumerate(lengths):
            key_valid[row, T - n:] = True
        position_ids = (key_valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)
        kv = decoder.new_cache(B, max_len)

        pixel_values = [p.pixel_values for p in self.prompts if p.pixel_values is not None]
        audio = [a for p in self.prompts for a in p.audio_features]
        logits, _ = model(input_ids, pixel_values=torch.cat(pixel_values).to(device) if pixel_values else None,
                          audio_features=[a.to(device) for a in audio],
                          attention_mask=key_valid[:, :T] if padded else None, position_ids=position_ids,
                          cache=CacheState(kv, torch.arange(T, device=device), T), logits_to_keep=1)
        logits = logits[:, -1]

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        streams = [TextStream(self.tokenizer, params.stop) for _ in range(B)]
        finish: list[str | None] = [None] * B
        history = input_ids if params.repetition_penalty != 1.0 else None
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        next_positions = position_ids[:, -1:] + 1
        for step in range(self.max_new_tokens):
            if self.suppress_ids:
                logits[:, self.suppress_ids] = float("-inf")
            tokens = sample(logits, params, generator, history)
            token_list = tokens.tolist()
            for row, token in enumerate(token_list):
                if finish[row] is not None:
                    continue
                if token in eos:
                    finish[row] = "stop"
                    continue
                delta = streams[row].add(token)
                if streams[row].stopped:
                    finish[row] = "stop"
                if delta:
                    yield row, delta
            if all(f is not None for f in finish) or step == self.max_new_tokens - 1:
                break
            if history is not None:
                history = torch.cat([history, tokens[:, None]], dim=1)
            slot = T + step
            logits, _ = decoder(input_ids=tokens[:, None], position_ids=next_positions,
                                attention_mask=key_valid[:, :slot + 1] if padded else None,
                                cache=CacheState(kv, torch.tensor([slot], device=device), slot + 1))
            key_valid[:, slot] = True
            next_positions = next_positions + 1
            logits = logits[:, -1]

        for row in range(B):
            tail = streams[row].finish()
            if tail:
                yield row, tail
            self.completions.append(Completion(
                text=streams[row].text, prompt_tokens=lengths[row], completion_tokens=len(streams[row].ids),
                finish_reason=finish[row] or "length", token_ids=list(streams[row].ids)))
