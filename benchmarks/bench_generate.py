"""Prefill and decode speed of SmolLM2-135M in tinyomni next to transformers' `generate`, same weights, one run.

    python benchmarks/bench_generate.py                 # prompt 128 tokens, 64 new tokens, fp32 and bf16
    python benchmarks/bench_generate.py --prompt 256 --new 128 --dtypes float32 --quantize int4

Dense rows: the GGUF dequantized once by tinyomni, loaded into tinyomni's decoder and into
transformers' `LlamaForCausalLM` (transformers' own GGUF loader would keep the weights packed and run
its dequantizing kernels, a different engine). Quantized rows: tinyomni's engine (`--quantize`,
tinyomni.engine.quantize_model: the GGUF's own blocks, C++ VNNI kernels when built) in the same
activation dtype. llama.cpp (when `llama-cpp-python` is importable) runs the GGUF file itself, once.
Prefill tok/s = prompt tokens / time to the first token; decode tok/s = (new tokens - 1) / time after
it; each the median of --repeats runs. Ratios are against transformers in the same dtype (llama.cpp's
against transformers fp32). Weights MB: bytes of weights the engine holds (tied tensors once);
GB/s: weights read per token (decode), which is what bounds decode on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import os
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


def time_llama_cpp(llm, ids: list[int], new: int) -> tuple[float, float]:
    """llama.cpp on the GGUF itself: prefill with eval(), then greedy one token at a time."""
    import numpy as np

    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    first = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    end = time.perf_counter()
    return len(ids) / (first - start), (new - 1) / (end - first)


def llama_cpp_model(path: str, context: int):
    """A llama.cpp model on the GGUF file, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=torch.get_num_threads(),
                           verbose=False)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers under `module`, each storage once (tied weights, shared blocks)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.numel():
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


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
    parser.add_argument("--quantize", nargs="*", default=["int8", "int4"], help="tinyomni engine modes to add")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and llama.cpp) threads; default torch's. On a loaded machine 1 thread "
                             "avoids OpenMP waiting on descheduled peers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tinyomni.checkpoints.gguf import smollm2_gguf_path
    from tinyomni.engine import kernel_path, quantize_model

    console = Console(width=170)  # the table is wider than a non-terminal default of 80
    ids = torch.randint(100, 40000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    load = os.getloadavg()
    table = Table(title=f"SmolLM2-135M, prompt {args.prompt}, {args.new} new tokens, "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__}, engine {kernel_path()}, "
                        f"load average {load[0]:.2f} / {load[1]:.2f} at start")
    for column in ("dtype", "engine", "weights MB", "prefill tok/s", "decode tok/s", "decode GB/s", "prefill ×",
                   "decode ×"):
        table.add_column(column, justify="right")
    baseline: dict[str, tuple[float, float]] = {}

    def add_row(dtype_name: str, engine: str, nbytes: int, rates: tuple[float, float], against: str) -> None:
        base = baseline.get(against)
        ratios = ("", "") if base is None else (f"{rates[0] / base[0]:.2f}", f"{rates[1] / base[1]:.2f}")
        table.add_row(dtype_name, engine, f"{nbytes / 1e6:.0f}", f"{rates[0]:.0f}", f"{rates[1]:.1f}",
                      f"{nbytes * rates[1] / 1e9:.1f}", *ratios)

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        if not args.no_transformers:
            with console.status(f"transformers {dtype_name}"):
                theirs = transformers_llama().to(dtype)
                baseline[dtype_name] = median_rates(functools.partial(time_transformers, theirs, ids, args.new),
                                                    args.repeats)
                add_row(dtype_name, "transformers", weight_bytes(theirs), baseline[dtype_name], dtype_name)
                del theirs
        for mode in [None, *args.quantize]:
            name = "tinyomni" if mode is None else f"tinyomni {mode}"
            with console.status(f"{name} {dtype_name}"):
                ours = tinyomni.load("smollm2", dtype=dtype)
                if mode is not None:
                    quantize_model(ours.model, mode)
                rates = median_rates(functools.partial(time_tinyomni, ours, ids, args.new), args.repeats)
                add_row(dtype_name, name, weight_bytes(ours.model.language_model), rates, dtype_name)
                del ours
    if not args.no_llama_cpp:
        path = str(smollm2_gguf_path())
        with console.status("llama.cpp"):
            llm = llama_cpp_model(path, args.prompt + args.new + 8)
            if llm is None:
                console.print("llama.cpp: llama-cpp-python is not installed, row skipped")
            else:
                import llama_cpp

                rates = median_rates(functools.partial(time_llama_cpp, llm, ids, args.new), args.repeats)
                add_row("Q4_1 file", f"llama.cpp {llama_cpp.__version__}", os.path.getsize(path), rates, "float32")
                del llm
    console.print(table)
    end = os.getloadavg()
    console.print(f"load average at the end: {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} (1 / 5 / 15 min)")


if __name__ == "__main__":
    main()
