"""Prefill and decode speed of SmolLM2-135M in tinyomni next to transformers' `generate`, same weights, one run.

    python benchmarks/bench_generate.py                 # prompt 128 tokens, 64 new tokens, fp32 and bf16
    python benchmarks/bench_generate.py --prompt 256 --new 128 --dtypes float32

Both run the same dense weights: the GGUF dequantized once by tinyomni, loaded into tinyomni's decoder
and into transformers' `LlamaForCausalLM` (transformers' own GGUF loader would keep the weights packed
and run its dequantizing kernels, a different engine). Prefill tok/s = prompt tokens / time to the first
token; decode tok/s = (new tokens - 1) / time after it. Each number is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import tinyomni
from tinyomni.api import load_base_decoder
from tinyomni.generate import Generation, SamplingParams
from tinyomni.processing.chat import Prompt


def time_tinyomni(model: tinyomni.Model, ids: list[int], new: int) -> tuple[float, float]:
    generation = Generation(model.model, model.tokenizer, [Prompt(ids)],
                            SamplingParams(max_new_tokens=new, ignore_eos=True), model.suppress_ids)
    start = time.perf_counter()
    first = None
    for _ in generation:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    tokens = generation.completions[0].completion_tokens
    return len(ids) / (first - start), (tokens - 1) / (end - first)


def time_transformers(model, ids: list[int], new: int) -> tuple[float, float]:

    x = torch.tensor([ids])
    times: list[float] = []

    class Clock:  # transformers calls put() once with the prompt, then once per new token
        def put(self, value):
            times.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=Clock())
    end = time.perf_counter()
    first = times[1]
    return len(ids) / (first - start), (new - 1) / (end - first)


def transformers_llama():
    """transformers' LlamaForCausalLM holding exactly the weights tinyomni decodes with."""
    import transformers

    base = load_base_decoder("smollm2")
    c = base.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(base.state, strict=False)
    model.tie_weights()
    return model.eval()


def median_rates(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: allocations, oneDNN kernel selection
    runs = [fn() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    console = Console()
    ids = torch.randint(100, 40000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    table = Table(title=f"SmolLM2-135M, prompt {args.prompt}, {args.new} new tokens, "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for column in ("dtype", "engine", "prefill tok/s", "decode tok/s", "prefill ×", "decode ×"):
        table.add_column(column, justify="right")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        with console.status(f"tinyomni {dtype_name}"):
            ours = tinyomni.load("smollm2", dtype=dtype)
            our_rates = median_rates(functools.partial(time_tinyomni, ours, ids, args.new), args.repeats)
            del ours
        if args.no_transformers:
            table.add_row(dtype_name, "tinyomni", f"{our_rates[0]:.0f}", f"{our_rates[1]:.1f}", "", "")
            continue
        with console.status(f"transformers {dtype_name}"):
            theirs = transformers_llama().to(dtype)
            their_rates = median_rates(functools.partial(time_transformers, theirs, ids, args.new), args.repeats)
            del theirs
        table.add_row(dtype_name, "transformers", f"{their_rates[0]:.0f}", f"{their_rates[1]:.1f}", "1.00", "1.00")
        table.add_row(dtype_name, "tinyomni", f"{our_rates[0]:.0f}", f"{our_rates[1]:.1f}",
                      f"{our_rates[0] / their_rates[0]:.2f}", f"{our_rates[1] / their_rates[1]:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
