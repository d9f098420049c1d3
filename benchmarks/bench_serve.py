"""Serving throughput: N concurrent streaming clients vs the same N requests one at a time.

Starts the server (as `tinyomni serve` would) in a child process on a free loopback port, then
sends N chat requests (each asking for `--tokens` tokens, greedy) with the official `openai` client,
first one after another, then all at once, and prints total tokens/s for both and their ratio. With
continuous batching one decode step serves every client, so the ratio should be well above 1.

    python benchmarks/bench_serve.py                      # SmolLM2-135M-Instruct, 8 clients, 32 tokens
    python benchmarks/bench_serve.py --model tiny --clients 4 --tokens 64
    python benchmarks/bench_serve.py --quantize int4      # the quantized engine (its fused decode step, batch > 1)
    python benchmarks/bench_serve.py --quantize int8 --batched-kernel off   # A/B: VNNI GEMV for batched steps

--batched-kernel off starts the server with TINYOMNI_BATCHED=0, so batched decode steps of a quantized
model run the VNNI GEMV instead of the AMX int8 batched kernel (engine/kernels/batched); the server
prints which one it uses.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai
import torch
import uvicorn

from tinyomni.api import load, tiny_random_model
from tinyomni.engine import ops
from tinyomni.serve.server import ServerOptions, create_app

TOPICS = ["a lighthouse keeper", "the moon", "a lost robot", "an old library", "a mountain village",
          "a clockmaker", "the ocean floor", "a desert caravan", "a winter forest", "a busy train station",
          "a secret garden", "a pirate ship", "a dragon's egg", "a jazz club", "a space station", "a bakery"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(client: openai.OpenAI, model: str, i: int, tokens: int) -> tuple[int, float, float]:
    """Stream one answer; returns (completion tokens, seconds to first token, total seconds)."""
    start = time.perf_counter()
    first = None
    usage = None
    question = f"Write a long story about {TOPICS[i % len(TOPICS)]}."
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    return usage.completion_tokens, first or 0.0, time.perf_counter() - start


def run(client: openai.OpenAI, model: str, clients: int, tokens: int, at_once: bool) -> dict:
    start = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: one_request(client, model, i, tokens), range(clients)))
    else:
        results = [one_request(client, model, i, tokens) for i in range(clients)]
    seconds = time.perf_counter() - start
    total = sum(r[0] for r in results)
    return {"tokens": total, "seconds": seconds, "tok_s": total / seconds,
            "ttft": statistics.mean(r[1] for r in results), "latency": statistics.mean(r[2] for r in results)}


def serve(args: argparse.Namespace) -> None:
    """The server process: load the model, serve it until terminated."""
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = tiny_random_model() if args.model == "tiny" else load(args.model, quantize=args.quantize)
    print(f"model {model.name}: loaded in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}; batched decode: {ops.batched_path()}", flush=True)
    options = ServerOptions(model_name="bench", max_batch=args.clients, max_queue=args.clients,
                            max_context=1024, max_tokens=max(args.tokens, 1))
    uvicorn.run(create_app(model, options), host="127.0.0.1", port=args.serve_port, log_level="warning")


def counters(base: str) -> tuple[int, int]:
    """The engine's (decode steps, prefill forwards) so far."""
    health = httpx.get(base + "/health").json()
    return health["steps"], health["prefills"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a model for tinyomni.load, or 'tiny' (random)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="serve a quantized model")
    parser.add_argument("--batched-kernel", choices=["on", "off"], default="on",
                        help="off: TINYOMNI_BATCHED=0 in the server (batched steps on the VNNI GEMV)")
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    if args.serve_port:
        return serve(args)

    # The server runs in its own process, as it would in use, so clients do not share its GIL.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, __file__, "--model", args.model, "--clients", str(args.clients),
                              "--tokens", str(args.tokens), "--serve-port", str(port)]
                             + (["--threads", str(args.threads)] if args.threads else [])
                             + (["--quantize", args.quantize] if args.quantize else []),
                             env={**os.environ, **({"TINYOMNI_BATCHED": "0"} if args.batched_kernel == "off" else {})})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.TransportError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        one_request(client, "bench", 0, 4)  # warm-up: first-call allocations, tokenizer caches
        c0 = counters(base)
        sequential = run(client, "bench", args.clients, args.tokens, at_once=False)
        c1 = counters(base)
        together = run(client, "bench", args.clients, args.tokens, at_once=True)
        c2 = counters(base)
        sequential["steps"], sequential["prefills"] = c1[0] - c0[0], c1[1] - c0[1]
        together["steps"], together["prefills"] = c2[0] - c1[0], c2[1] - c1[1]
    finally:
        child.terminate()
        child.wait(timeout=30)

    batched = f", batched kernel {args.batched_kernel}" if args.quantize else ""
    print(f"\n{args.clients} requests x {args.tokens} tokens, {args.quantize or 'float'} weights{batched} "
          "(greedy, streaming, openai client over loopback, server in its own process)\n")
    print(f"{'mode':<18}{'tokens':>8}{'steps':>7}{'prefills':>10}{'seconds':>9}{'tok/s':>8}{'mean TTFT s':>13}"
          f"{'mean latency s':>16}")
    for name, r in [("one at a time", sequential), (f"{args.clients} concurrent", together)]:
        print(f"{name:<18}{r['tokens']:>8}{r['steps']:>7}{r['prefills']:>10}{r['seconds']:>9.2f}{r['tok_s']:>8.1f}"
              f"{r['ttft']:>13.3f}{r['latency']:>16.2f}")
    print(f"\nthroughput ratio (concurrent / one at a time): {together['tok_s'] / sequential['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
