"""Continuous batching: many requests share one model, one decode step at a time.

One background thread owns the model and its KV cache (`[max_batch, kv_heads, max_context, head_dim]`
per layer); each cache row holds one request. Every loop iteration

  1. frees the rows of cancelled requests (a client that went away),
  2. admits waiting requests into free rows: each prompt embedded alone (its images and audio),
     then one decoder prefill for all of them together (right-padded, see `_prefill`),
  3. runs ONE decode step for all active rows together: each row feeds its last token at its own
     cache slot (per-row positions) and attends only to its own filled slots (a key mask),
  4. samples each row with its own parameters and seed, and pushes its text delta to its consumer;
     a row that hits end-of-turn, a stop string or its token budget is freed at once.

A request joins or leaves between two steps without waiting for the others. On a CPU a decode step
costs about the time to read every weight once, whatever the batch, so eight clients decoding
together get far more tokens per second than eight served one after another.

    engine = Engine(tinyomni.load("smollm2"), max_batch=8).start()
    request = engine.submit(model.prepare("Hi!"), SamplingParams(max_new_tokens=32))
    print("".join(request))            # or, in asyncio: submit(..., loop=loop) and `request.deltas()`
    engine.close()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from tinyomni.api import Model
from tinyomni.errors import ContextLengthError, TinyOmniError
from tinyomni.generate import Completion, SamplingParams, TextStream, greedy, sample
from tinyomni.model.decoder import CacheState, KVCache
from tinyomni.processing.chat import Prompt

log = logging.getLogger("tinyomni.serve")
_request_ids = itertools.count()


class QueueFullError(TinyOmniError):
    """Every cache row is busy and the waiting queue is full: the caller should retry later."""


class EngineClosedError(TinyOmniError):
    """The engine was shut down before (or while) this request ran."""


class EngineFailedError(EngineClosedError):
    """The engine loop itself died (a bug, not a request's fault): nothing more will be generated."""


class RequestCancelled(TinyOmniError):
    """The request was cancelled (its client disconnected) before it finished."""


# Padded tokens one batched prefill may hold (rows x the group's longest prompt): bounds its memory
# and the work spent on padding; a prompt longer than this is prefilled alone.
PREFILL_TOKENS = 4096


def prefill_groups(items: list[tuple[Request, Tensor]], budget: int) -> list[list[tuple[Request, Tensor]]]:
    """Split (request, embeddings) into groups prefilled together, in arrival order: a group grows
    while its rows x its longest prompt stays within `budget` tokens (one prompt always fits)."""
    groups: list[list[tuple[Request, Tensor]]] = []
    longest = 0
    for item in items:
        n = len(item[1])
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= budget:
            groups[-1].append(item)
            longest = max(longest, n)
        else:
            groups.append([item])
            longest = n
    return groups


class Request:
    """One generation inside the engine.

    The engine thread reports events: ("start", None) once the prompt is prefilled, ("delta", text)
    as text arrives, then ("done", Completion) or an error. Read them with `for delta in request`
    (threads) or `await request.next_event()` / `async for delta in request.deltas()` (asyncio; pass
    the loop to `Engine.submit`). `cancel()` makes the engine free the request's row at its next step.
    """

    def __init__(self, prompt: Prompt, params: SamplingParams, max_new_tokens: int,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = next(_request_ids)
        self.prompt = prompt
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.completion: Completion | None = None
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        # Decoding state, touched only by the engine thread.
        self.row = -1
        self.length = 0  # cache slots filled (prompt + fed tokens)
        self.next_token = -1  # sampled, not yet fed to the model
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.history: Tensor | None = None  # prompt + answer ids, for the repetition penalty

    def cancel(self) -> None:
        self.cancelled = True

    # --- consumer side -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        """Text deltas until the answer is complete (thread consumers; blocks)."""
        assert isinstance(self._events, queue.SimpleQueue), "submitted with a loop: use `deltas()`"
        while True:
            kind, value = self._check(self._events.get())
            if kind == "delta":
                yield value
            elif kind == "done":
                return

    async def next_event(self) -> tuple[str, Any]:
        """The next ("start" | "delta" | "done", value) event; raises the request's error."""
        assert isinstance(self._events, asyncio.Queue), "submitted without a loop: iterate instead"
        return self._check(await self._events.get())

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until the answer is complete; afterwards `completion` holds the totals."""
        while True:
            kind, value = await self.next_event()
            if kind == "delta":
                yield value
            elif kind == "done":
                return

    def _check(self, event: tuple[str, Any]) -> tuple[str, Any]:
        kind, value = event
        if kind == "error":
            raise value
        if kind == "done":
            self.completion = value
        return event

    # --- engine side -------------------------------------------------------------------------------
    def _emit(self, kind: str, value: Any = None) -> None:
        if self._loop is None:
            self._events.put((kind, value))
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    """Owns the model in one background thread and serves every request through one batch."""

    def __init__(self, model: Model, max_batch: int = 8, max_context: int | None = None,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        context = model.config.decoder.max_position_embeddings
        self.model = model
        self.max_batch = max_batch
        self.max_context = min(max_context or context, context)
        self.max_queue = max_queue
        self._decoder = model.model.language_model
        self._device = self._decoder.model.embed_tokens.weight.device
        self._eos = set(model.tokenizer.eos_token_ids)
        self._suppress = list(model.suppress_ids)
        self._waiting: queue.Queue[Request] = queue.Queue(max_queue)  # bounded: a full one means "busy"
        self._rows: list[Request | None] = [None] * max_batch
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._kv: KVCache | None = None  # allocated by start(); the engine's own, not the model's
        self.steps = 0  # decode steps run, for stats and tests
        self.prefills = 0  # decoder prefill forwards run (each serves one or more requests)
        self.tokens = 0  # tokens generated
        self.failure: BaseException | None = None  # why the loop died, if it did (then health is 503)
        self.on_failure: Callable[[BaseException], None] | None = None  # e.g. stop the HTTP server

    # --- public ------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._kv = self._decoder.new_cache(self.max_batch, self.max_context)
        self._thread = threading.Thread(target=self._run, name="tinyomni-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop, fail whatever was still running or waiting, release the cache."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for row, request in enumerate(self._rows):
            if request is not None:
                request._emit("error", EngineClosedError("the server is shutting down"))
                self._rows[row] = None
        self._fail_waiting()
        self._kv = None

    def submit(self, prompt: Prompt, params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue a prepared prompt. Raises InputError (bad parameters), ContextLengthError, or
        QueueFullError when `max_queue` requests are already waiting."""
        params.validate()
        if self.failure is not None:
            raise EngineFailedError(f"the engine has stopped after an internal error "
                                    f"({type(self.failure).__name__}); restart the server")
        if self._closed.is_set() or self._thread is None:
            raise EngineClosedError("the engine is not running")
        n = len(prompt.input_ids)
        if n >= self.max_context:
            raise ContextLengthError(
                f"the prompt is {n} tokens (media placeholders included) but this server's context is "
                f"{self.max_context} tokens; shorten the text, use fewer images/tiles or shorter audio")
        request = Request(prompt, params, min(params.max_new_tokens, self.max_context - n), loop)
        try:
            self._waiting.put_nowait(request)
        except queue.Full:
            raise QueueFullError(f"the server is busy: {self.max_batch} requests are running and "
                                 f"{self.max_queue} are waiting; retry shortly") from None
        return request

    @property
    def cache_bytes(self) -> int:
        """Memory the KV cache takes: keys and values for every layer, row and slot."""
        dec = self.model.config.decoder
        itemsize = self._decoder.model.embed_tokens.weight.element_size()
        return (2 * dec.num_hidden_layers * dec.num_key_value_heads * dec.attn_head_dim * itemsize
                * self.max_batch * self.max_context)  # known before start(), for the startup line

    def stats(self) -> dict[str, int]:
        return {"active": sum(r is not None for r in self._rows), "waiting": self._waiting.qsize(),
                "max_batch": self.max_batch, "max_queue": self.max_queue, "max_context": self.max_context,
                "steps": self.steps, "prefills": self.prefills, "tokens": self.tokens}

    # --- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        # Each request's own failures are caught where they happen (_prefill, _step, _fail); this is
        # the last line: a bug in the loop fails everything loudly instead of leaving clients waiting.
        try:
            with torch.inference_mode():
                while not self._closed.is_set():
                    self._free_cancelled()
                    self._admit()
                    if any(self._rows):
                        self._step()
        except BaseException as e:
            self.failure = e
            log.critical("the engine loop died; no more requests can be served", exc_info=e)
            error = EngineFailedError(f"the engine stopped after an internal error ({type(e).__name__})")
            for row, request in enumerate(self._rows):
                if request is not None:
                    request._emit("error", error)
                    self._rows[row] = None
            self._fail_waiting(error)
            if self.on_failure is not None:
                self.on_failure(e)

    def _free_cancelled(self) -> None:
        for request in self._rows:
            if request is not None and request.cancelled:
                self._free(request)
                request._emit("error", RequestCancelled("cancelled"))

    def _admit(self) -> None:
        """Move waiting requests into free rows, all prefilled together; when idle, wait a little for one."""
        idle = not any(self._rows)
        free = self._rows.count(None)
        batch: list[Request] = []
        while len(batch) < free:
            try:
                # Blocking with a timeout (not forever) lets close() stop an idle loop promptly.
                request = self._waiting.get(timeout=0.1) if idle else self._waiting.get_nowait()
            except queue.Empty:
                break
            idle = False
            if request.cancelled:
                request._emit("error", RequestCancelled("cancelled"))
                continue
            batch.append(request)
        if batch:
            self._prefill(batch)

    def _prefill(self, requests: list[Request]) -> None:
        """Write the prompts (with their media) into free cache rows and sample each first token.

        Each prompt is embedded on its own (its images and audio encoded, its placeholders filled), so
        bad media fails that request alone; then the decoder runs once for a group of them, prompts
        right-padded to the longest: each row's tokens sit at slots 0..n-1 as they would alone, and
        causal attention never lets a real token see the padding after it. The padding's keys land in
        slots past the row's length, which decode overwrites before any mask lets them be read.
        """
        embedded: list[tuple[Request, Tensor]] = []
        for request in requests:
            try:  # anything wrong with this one request (its media, its parameters) fails it alone
                embedded.append((request, self._embed(request)))
            except Exception as e:
                self._fail(request, e, "prefill")
        rows = [row for row, r in enumerate(self._rows) if r is None]
        for group in prefill_groups(embedded, PREFILL_TOKENS):
            group_rows, rows = rows[:len(group)], rows[len(group):]
            try:
                logits = self._prefill_rows(group, group_rows)
            except Exception as e:
                if len(group) == 1:
                    self._fail(group[0][0], e, "prefill")
                    continue
                # One forward served the whole group: redo each alone, so only the guilty one fails.
                for item, row in zip(group, group_rows):
                    try:
                        self._start([item[0]], [row], self._prefill_rows([item], [row]))
                    except Exception as e:
                        self._fail(item[0], e, "prefill")
                continue
            self._start([request for request, _ in group], group_rows, logits)

    def _embed(self, request: Request) -> Tensor:
        """One prompt's input embeddings [n, hidden], its media encoded into their placeholders."""
        prompt, device, params = request.prompt, self._device, request.params
        if params.seed is not None:
            request.generator = torch.Generator(device=device).manual_seed(params.seed)
        ids = torch.tensor([prompt.input_ids], device=device)
        pixels = prompt.pixel_values.to(device) if prompt.pixel_values is not None else None
        embeds = self.model.model.embed(
            ids, pixel_values=pixels, audio_features=[a.to(device) for a in prompt.audio_features],
            qformer_input_ids=[torch.tensor(q, device=device) for q in prompt.qformer_input_ids] or None,
            image_layouts=prompt.image_layouts or None)
        return embeds[0]

    def _prefill_rows(self, group: list[tuple[Request, Tensor]], rows: list[int]) -> Tensor:
        """Run the decoder over right-padded prompts into cache `rows`; the logits [B, vocab] at each
        prompt's last token."""
        device = self._device
        lengths = [len(embeds) for _, embeds in group]
        T = max(lengths)
        first = group[0][1]
        x = first.new_zeros(len(group), T, first.shape[-1])  # zero padding: finite through every norm
        for b, (_, embeds) in enumerate(group):
            x[b, :len(embeds)] = embeds
        ids = torch.full((len(group), T), -1, dtype=torch.long, device=device)  # -1: padding, no token
        for b, (request, _) in enumerate(group):
            ids[b, :lengths[b]] = torch.tensor(request.prompt.input_ids, device=device)
        slots = torch.arange(T, device=device)
        self.prefills += 1
        hidden = self._decoder.hidden_states(
            x, slots.expand(len(group), T),
            cache=CacheState(self._kv, slots, T, rows=torch.tensor(rows, device=device)),
            **self.model.model.decoder_inputs(ids))  # a visual-expert decoder: where the image tokens are
        last = hidden[torch.arange(len(group), device=device), torch.tensor(lengths, device=device) - 1]
        return self._decoder.lm_head(last[:, None])[:, -1]

    def _start(self, requests: list[Request], rows: list[int], logits: Tensor) -> None:
        """Prefilled requests take their rows, report "start", and get their first tokens."""
        for request, row in zip(requests, rows):
            params = request.params
            request.row, request.length = row, len(request.prompt.input_ids)
            request.stream = TextStream(self.model.tokenizer, params.stop,
                                        0 if params.ignore_eos else params.max_repeat_tokens)
            if params.repetition_penalty != 1.0:
                request.history = torch.tensor([request.prompt.input_ids], device=self._device)
            self._rows[row] = request
            request._emit("start")
        for request, token in zip(requests, self._sample(requests, logits)):
            try:
                if isinstance(token, Exception):
                    raise token
                self._accept(request, token)
            except Exception as e:
                self._fail(request, e, "prefill")

    def _step(self) -> None:
        """One decode step for every active row, each at its own slot."""
        active = [r for r in self._rows if r is not None]
        device = self._device
        tokens = torch.tensor([[r.next_token] for r in active], device=device)
        slots = torch.tensor([[r.length] for r in active], device=device)  # [B, 1]: where each row writes
        kv_len = max(r.length for r in active) + 1
        # Row b reads its own slots 0..length_b (the new token included), never another row's leftovers.
        key_valid = torch.arange(kv_len, device=device)[None, :] <= slots
        rows = torch.tensor([r.row for r in active], device=device)
        try:
            logits, _ = self._decoder(input_ids=tokens, position_ids=slots, attention_mask=key_valid,
                                      cache=CacheState(self._kv, slots, kv_len, rows=rows))
        except Exception as e:  # one step serves every row: none of them can go on
            for request in active:
                self._fail(request, e, "decode step")
            return
        self.steps += 1
        for request in active:
            request.length += 1
        for request, token in zip(active, self._sample(active, logits[:, -1])):
            try:
                if isinstance(token, Exception):
                    raise token
                self._accept(request, token)
            except Exception as e:
                self._fail(request, e, "sampling")

    def _sample(self, requests: list[Request], logits: Tensor) -> list[int | Exception]:
        """One token per row, each with its own request's parameters and random generator; a row
        whose sampling fails gets its exception in place of a token."""
        if self._suppress:
            logits[:, self._suppress] = float("-inf")  # media tokens are inputs only
        best = greedy(logits.float()).tolist()  # the common case, batched
        tokens: list[int | Exception] = []
        for i, request in enumerate(requests):
            params = request.params
            if params.temperature == 0 and params.repetition_penalty == 1.0:
                tokens.append(best[i])
                continue
            try:
                tokens.append(int(sample(logits[i:i + 1], params, request.generator, request.history)))
            except Exception as e:
                tokens.append(e)
        return tokens

    def _fail(self, request: Request, error: Exception, stage: str) -> None:
        """End one request with `error` and free its row; the loop goes on."""
        if not isinstance(error, TinyOmniError):  # not the input's fault: worth a line in the log (the
            # traceback travels with the error to whoever waits for the request, e.g. the server)
            log.warning("request %d failed during %s: %s: %s", request.id, stage, type(error).__name__, error)
        self._free(request)
        request._emit("error", error)

    def _accept(self, request: Request, token: int) -> None:
        """Emit a sampled token's text; finish the request or keep the token to feed next step."""
        self.tokens += 1
        if token in self._eos:
            return self._finish(request, "stop")
        stream = request.stream
        delta = stream.add(token)
        if delta:
            request._emit("delta", delta)
        if stream.stopped:
            return self._finish(request, stream.reason)
        if len(stream.ids) >= request.max_new_tokens:
            return self._finish(request, "length")
        request.next_token = token
        if request.history is not None:
            request.history = torch.cat([request.history, request.history.new_tensor([[token]])], dim=1)

    def _finish(self, request: Request, reason: str) -> None:
        stream = request.stream
        tail = stream.finish()
        if tail:
            request._emit("delta", tail)
        self._free(request)
        request._emit("done", Completion(text=stream.text, prompt_tokens=len(request.prompt.input_ids),
                                         completion_tokens=len(stream.ids), finish_reason=reason,
                                         token_ids=list(stream.ids)))

    def _free(self, request: Request) -> None:
        if 0 <= request.row < self.max_batch and self._rows[request.row] is request:
            self._rows[request.row] = None  # the row's stale slots are never read: masks stop at length

    def _fail_waiting(self, error: Exception | None = None) -> None:
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            request._emit("error", error or EngineClosedError("the server is shutting down"))
