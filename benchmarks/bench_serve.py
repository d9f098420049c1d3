"""Serving throughput: N concurrent streaming clients vs the same N requests one at a time.

Starts `tinyomni serve` in-process on a free loopback port, then sends N chat requests (each asking
for `--tokens` tokens, greedy) with the official `openai` client, first one after another, then all
at once, and prints total tokens/s for both and their ratio. With continuous batching the concurrent
run reads the weights once per step for all clients, so the ratio should be well above 1.

    python benchmarks/bench_serve.py                      # SmolLM2-135M-Instruct, 8 clients, 32 tokens
    python benchmarks/bench_serve.py --model tiny --clients 4 --tokens 64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import statistics
import threading
import time

import openai
import torch
import uvicorn

from tinyomni.api import load, tiny_random_model
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a model for tinyomni.load, or 'tiny' (random)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = tiny_random_model() if args.model == "tiny" else load(args.model)
    print(f"model {model.name}: loaded in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    options = ServerOptions(model_name="bench", max_batch=args.clients, max_queue=args.clients,
                            max_context=1024, max_tokens=max(args.tokens, 1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, options), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=600)
        one_request(client, "bench", 0, 4)  # warm-up: first-call allocations, tokenizer caches
        sequential = run(client, "bench", args.clients, args.tokens, at_once=False)
        together = run(client, "bench", args.clients, args.tokens, at_once=True)
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    print(f"\n{args.clients} requests x {args.tokens} tokens "
          "(greedy, streaming, openai client over loopback)\n")
    print(f"{'mode':<24}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'mean TTFT s':>13}{'mean latency s':>16}")
    for name, r in [("one at a time", sequential), (f"{args.clients} concurrent", together)]:
        print(f"{name:<24}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tok_s']:>10.1f}{r['ttft']:>13.3f}"
              f"{r['latency']:>16.2f}")
    print(f"\nthroughput ratio (concurrent / one at a time): {together['tok_s'] / sequential['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
