"""Prefill and decode speed of SmolLM2-135M in tinyomni next to transformers' `generate` and llama.cpp,
same weights, one run.

    python benchmarks/bench_generate.py                 # prompt 128 tokens, 64 new tokens, fp32 and bf16
    python benchmarks/bench_generate.py --prompt 256 --new 128 --dtypes float32 --quantize int4
    python benchmarks/bench_generate.py --no-transformers --dtypes float32 --threads 1   # the engine vs llama.cpp

Dense rows: the GGUF dequantized once by tinyomni, loaded into tinyomni's decoder and into
transformers' `LlamaForCausalLM` (transformers' own GGUF loader would keep the weights packed and run
its dequantizing kernels, a different engine). Quantized rows: tinyomni's engine (`--quantize`,
tinyomni.engine.quantize_model: the GGUF's own blocks, C++ VNNI kernels when built) in the same
activation dtype. llama.cpp (when `llama-cpp-python` is importable) runs the GGUF files themselves:
SmolLM2's Q4_1 file, and a Q8_0 file of the same model (`tinyomni export smollm2 --to gguf --outtype
q8_0`, written once under the cache, or --q8-gguf) that tinyomni int8 also runs from its own blocks;
"vs llama.cpp" is each quantized row against llama.cpp on the same file (int4 and int8 of the Q4_1
file against Q4_1; int8 of the Q8_0 file against Q8_0).
Quantized prompts run prefill's AMX GEMM where the CPU has AMX (the title says which path;
TINYOMNI_PREFILL=dequantize selects the older dequantize + matmul path for an A/B run).
Each row runs in a fresh Python process (--same-process: all in this one, the old way).
Prefill tok/s = prompt tokens / time to the first token; decode tok/s = (new tokens - 1) / time after
it; each the median of --repeats runs. Ratios are against transformers in the same dtype (llama.cpp's
against transformers fp32). Weights MB: bytes of weights the engine holds (tied tensors once);
GB/s: weights read per token (decode), which is what bounds decode on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import tinyomni
from tinyomni.api import load_base_decoder
from tinyomni.generate import Generation, SamplingParams
from tinyomni.processing.chat import Prompt

# Wall time by default; --clock cpu counts this process's CPU time instead, which a loaded machine
# inflates far less (with --threads 1 it is the work done, whoever else is running).
clock = time.perf_counter


def time_tinyomni(model: tinyomni.Model, ids: list[int], new: int) -> tuple[float, float]:
    generation = Generation(model.model, model.tokenizer, [Prompt(ids)],
                            SamplingParams(max_new_tokens=new, ignore_eos=True), model.suppress_ids)
    start = clock()
    first = None
    for _ in generation:
        if first is None:
            first = clock()
    end = clock()
    tokens = generation.completions[0].completion_tokens
    return len(ids) / (first - start), (tokens - 1) / (end - first)


def time_transformers(model, ids: list[int], new: int) -> tuple[float, float]:

    x = torch.tensor([ids])
    times: list[float] = []

    class Clock:  # transformers calls put() once with the prompt, then once per new token
        def put(self, value):
            times.append(clock())

        def end(self):
            pass

    start = clock()
    with torch.inference_mode():
        model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=Clock())
    end = clock()
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
    start = clock()
    llm.eval(ids)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    first = clock()
    for _ in range(new - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    end = clock()
    return len(ids) / (first - start), (new - 1) / (end - first)


def llama_cpp_model(path: str, context: int):
    """A llama.cpp model on the GGUF file, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    # n_threads_batch too: its default (every core) would make llama.cpp's prefill use other threads than ours.
    threads = torch.get_num_threads()
    return llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def q8_0_gguf(path: str | None) -> Path:
    """A Q8_0 GGUF of SmolLM2 (every matrix Q8_0), exported by tinyomni once and kept under the cache."""
    if path:
        return Path(path)
    from tinyomni.checkpoints.export_gguf import export_gguf

    out = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyomni" / "bench" / "smollm2-q8_0.gguf"
    if not out.is_file():
        export_gguf(tinyomni.load("smollm2"), out, "q8_0")
    return out


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


def measure(spec: dict, ids: list[int], new: int, repeats: int) -> dict:
    """One row: load the engine named by `spec`, time it, return its rates and weight bytes."""
    from tinyomni.engine import quantize_model

    engine, dtype_name, mode, path = spec["engine"], spec["dtype"], spec.get("mode"), spec.get("path")
    if engine == "llama.cpp":
        llm = llama_cpp_model(path, len(ids) + new + 8)
        if llm is None:
            return {"missing": "llama-cpp-python is not installed"}
        import llama_cpp

        rates = median_rates(functools.partial(time_llama_cpp, llm, ids, new), repeats)
        return {"rates": rates, "bytes": os.path.getsize(path), "version": llama_cpp.__version__}
    dtype = getattr(torch, dtype_name)
    if engine == "transformers":
        theirs = transformers_llama().to(dtype)
        rates = median_rates(functools.partial(time_transformers, theirs, ids, new), repeats)
        return {"rates": rates, "bytes": weight_bytes(theirs)}
    ours = tinyomni.load(path, dtype=dtype)
    if mode is not None:
        quantize_model(ours.model, mode)
    rates = median_rates(functools.partial(time_tinyomni, ours, ids, new), repeats)
    return {"rates": rates, "bytes": weight_bytes(ours.model.language_model)}


def run_row(spec: dict, args: argparse.Namespace, ids: list[int]) -> dict:
    """`measure` in a fresh Python process (the default), so no engine runs beside another's threads,
    allocations or thread-pool state: in one process, llama.cpp's OpenMP threads measurably slowed the
    tinyomni rows measured after it (docs/benchmarks.md)."""
    if args.same_process:
        return measure(spec, ids, args.new, args.repeats)
    command = [sys.executable, __file__, "--row", json.dumps(spec), "--prompt", str(args.prompt), "--new",
               str(args.new), "--repeats", str(args.repeats), "--clock", args.clock]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"row {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_ids(n: int) -> list[int]:
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--quantize", nargs="*", default=["int8", "int4"], help="tinyomni engine modes to add")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-q8", action="store_true", help="skip the Q8_0 file's rows (tinyomni int8, llama.cpp)")
    parser.add_argument("--q8-gguf", default=None, help="a Q8_0 GGUF of SmolLM2 (default: exported once, cached)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and llama.cpp) threads; default torch's. On a loaded machine 1 thread "
                             "avoids OpenMP waiting on descheduled peers")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or this process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every row in this process, one after another (the old way; engines then "
                             "share thread pools and allocator state)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row, JSON out
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = prompt_ids(args.prompt)
    if args.row is not None:
        print(json.dumps(measure(json.loads(args.row), ids, args.new, args.repeats)))
        return

    from tinyomni.checkpoints.gguf import smollm2_gguf_path
    from tinyomni.engine import kernel_path, ops

    console = Console(width=170)  # the table is wider than a non-terminal default of 80
    load = os.getloadavg()
    table = Table(title=f"SmolLM2-135M, prompt {args.prompt}, {args.new} new tokens, "
                        f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}, "
                        f"engine {kernel_path()}, prefill {ops.prefill_path()}, "
                        f"{'one process' if args.same_process else 'a fresh process per row'}, "
                        f"load average {load[0]:.2f} / {load[1]:.2f} at start")
    for column in ("dtype", "engine", "file", "weights MB", "prefill tok/s", "decode tok/s", "decode GB/s",
                   "prefill ×", "decode ×", "prefill vs llama.cpp", "decode vs llama.cpp"):
        table.add_column(column, justify="right")
    baseline: dict[str, tuple[float, float]] = {}
    peers: dict[str, tuple[float, float]] = {}  # llama.cpp's rates by file, run first
    rows: list[tuple] = []

    def add_row(dtype_name: str, engine: str, file: str, nbytes: int, rates: tuple[float, float], against: str,
                peer: str | None = None) -> None:
        rows.append((dtype_name, engine, file, nbytes, rates, against, peer))

    def ratio(rates: tuple[float, float], base: tuple[float, float] | None) -> tuple[str, str]:
        return ("", "") if base is None else (f"{rates[0] / base[0]:.2f}", f"{rates[1] / base[1]:.2f}")

    q4_path = str(smollm2_gguf_path())
    files = {"Q4_1": q4_path}
    if not args.no_q8:
        with console.status("the Q8_0 file"):
            files["Q8_0"] = str(q8_0_gguf(args.q8_gguf))
    if not args.no_llama_cpp:  # first, so every tinyomni row can show its ratio as it is measured
        for kind, path in files.items():
            with console.status(f"llama.cpp {kind}"):
                got = run_row({"engine": "llama.cpp", "dtype": "float32", "path": path}, args, ids)
            if "missing" in got:
                console.print(f"llama.cpp: {got['missing']}, rows skipped")
                break
            peers[kind] = tuple(got["rates"])
            add_row(f"{kind} file", f"llama.cpp {got['version']}", kind, got["bytes"], peers[kind], "float32", kind)

    for dtype_name in args.dtypes:
        if not args.no_transformers:
            with console.status(f"transformers {dtype_name}"):
                got = run_row({"engine": "transformers", "dtype": dtype_name}, args, ids)
            baseline[dtype_name] = tuple(got["rates"])
            add_row(dtype_name, "transformers", "dense", got["bytes"], baseline[dtype_name], dtype_name)
        runs = [(None, "Q4_1"), *((mode, "Q4_1") for mode in args.quantize)]
        if "Q8_0" in files and "int8" in args.quantize:
            runs.append(("int8", "Q8_0"))
        for mode, kind in runs:
            name = "tinyomni" if mode is None else f"tinyomni {mode}"
            with console.status(f"{name} {dtype_name} ({kind} file)"):
                spec = {"engine": "tinyomni", "dtype": dtype_name, "mode": mode,
                        "path": "smollm2" if kind == "Q4_1" else files[kind]}
                got = run_row(spec, args, ids)
            add_row(dtype_name, name, "dense" if mode is None else kind, got["bytes"], tuple(got["rates"]),
                    dtype_name, None if mode is None else kind)
    rows.sort(key=lambda r: r[0].endswith("file"))  # llama.cpp rows last, as before
    for dtype_name, engine, file, nbytes, rates, against, peer in rows:
        vs_peer = ("", "") if engine.startswith("llama.cpp") else ratio(rates, peers.get(peer))
        table.add_row(dtype_name, engine, file, f"{nbytes / 1e6:.0f}", f"{rates[0]:.0f}", f"{rates[1]:.1f}",
                      f"{nbytes * rates[1] / 1e9:.1f}", *ratio(rates, baseline.get(against)), *vs_peer)
    console.print(table)
    end = os.getloadavg()
    console.print(f"load average at the end: {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} (1 / 5 / 15 min)")


if __name__ == "__main__":
    main()
