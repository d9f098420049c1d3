"""Start-up and memory: how long until a model can answer, what a one-shot `tinyomni chat` costs, cold
and warm, and how much memory a model holds in float32 and in int4.

Each measurement runs in a fresh Python process (what a user's command pays), in one run, so the
ratios compare like with like on a shared machine:

- `load()` of the default model (tinyomni-world: the SmolLM2 GGUF dequantized, its LoRA adapter
  merged) with the load cache off (every load builds), then with a warm cache (one mmap'd
  safetensors read); the same with `quantize="int4"` (the cache then holds a quantized checkpoint,
  engine/checkpoint.py, read as it is);
- the same for `load("smollm2")`, next to transformers reading the same GGUF (`from_pretrained(...,
  gguf_file=...)`: it dequantizes too) as the reference;
- `tinyomni chat "What is the capital of France?"` end to end (interpreter, imports, load, answer),
  cold and warm, float32 and `--quantize int4`; and each process's peak resident memory;
- memory: the resident set after `load()` and one answer, float32 vs int4 (the issue's target:
  int4 <= 0.4x float32), whole process and above a bare `import tinyomni.api` (torch and the code).

    python benchmarks/bench_startup.py            # a few minutes on 2 idle cores
    python benchmarks/bench_startup.py --repeat 3 # best of three per row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LOAD = """
import json, resource, sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
import {module}
t1 = time.perf_counter()
base = rss_mb()
{setup}
model = {expr}
t2 = time.perf_counter()
{after}
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "rss_now_mb": rss_mb(), "rss_import_mb": base,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
# (module imported, set-up, the expression that loads) for each kind of row.
TINYOMNI = ("tinyomni.api", "", "tinyomni.load({spec!r}, quantize={quantize!r})")  # `import tinyomni` alone is lazy
TRANSFORMERS = ("transformers", "from tinyomni.checkpoints.gguf import smollm2_gguf_path; p = smollm2_gguf_path()",
                "transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)")
ANSWER = "model.chat('What is the capital of France?', max_new_tokens=16)"
QUESTION = "What is the capital of France?"


def python(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"a measured process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_code(spec: str, quantize: str | None = None, after: str = "") -> str:
    module, setup, expr = TINYOMNI
    return LOAD.format(module=module, setup=setup, expr=expr.format(spec=spec, quantize=quantize), after=after)


def chat(env: dict[str, str], *flags: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a one-shot `tinyomni chat` (as `python -m tinyomni.cli` runs it)."""
    start = time.perf_counter()
    code = ("import resource, sys; from tinyomni.cli import main; rc = main(['chat', "
            f"{QUESTION!r}, '--no-stream', *{list(flags)!r}]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tinyomni chat failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, float(out.stderr.strip().splitlines()[-1])


def best(runs: list[dict], key: str) -> dict:
    return min(runs, key=lambda r: r[key])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the best is shown")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-building", action="store_true", help="skip the rows that build (cache off)")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    cache = tempfile.mkdtemp(prefix="tinyomni-bench-cache-")
    cold = {**os.environ, "TINYOMNI_CACHE": "off"}
    warm = {**os.environ, "TINYOMNI_CACHE": cache}
    rows = []
    for spec, quantize in (("tinyomni-world", None), ("tinyomni-world", "int4"), ("smollm2", None)):
        code = load_code(spec, quantize)
        label = f"load({spec!r}{', quantize=' + repr(quantize) if quantize else ''})"
        if not args.no_building:
            rows.append((f"{label}, building", best([python(code, cold) for _ in range(args.repeat)], "load")))
        python(code, warm)  # fills the cache
        rows.append((f"{label}, from the cache", best([python(code, warm) for _ in range(args.repeat)], "load")))
    reference = None
    if not args.no_transformers:
        module, setup, expr = TRANSFORMERS
        reference = best([python(LOAD.format(module=module, setup=setup, expr=expr, after=""), cold)
                          for _ in range(args.repeat)], "load")
        rows.append(("transformers from_pretrained(SmolLM2 GGUF)", reference))

    table = Table(title="start-up (each row a fresh process)")
    for column in ("what", "import s", "load s", "peak RSS MB", "load vs transformers"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for name, r in rows:
        ratio = f"{reference['load'] / r['load']:.1f}x faster" if reference and "transformers" not in name else ""
        table.add_row(name, f"{r['import']:.2f}", f"{r['load']:.2f}", f"{r['rss_mb']:.0f}", ratio)
    chats = {}
    for label, flags in (("", ()), (" --quantize int4", ("--quantize", "int4"))):
        if not args.no_building:
            chats[f"building{label}"] = min((chat(cold, *flags) for _ in range(args.repeat)), key=lambda c: c[0])
        chats[f"from the cache{label}"] = min((chat(warm, *flags) for _ in range(args.repeat)), key=lambda c: c[0])
    for label, (wall, peak) in chats.items():
        table.add_row(f"tinyomni chat one-shot, {label}", "", f"{wall:.2f} wall", f"{peak:.0f}", "")
    Console(width=140).print(table)

    # Memory: the resident set once a model has answered, each from a warm cache, float32 vs int4.
    memory = Table(title="memory after load() and one answer (from the cache; each a fresh process)")
    for column in ("model", "RSS MB", "above `import tinyomni.api` MB", "vs float32"):
        memory.add_column(column, justify="right" if column != "model" else "left")
    measured = {q: best([python(load_code("tinyomni-world", q, ANSWER), warm) for _ in range(args.repeat)],
                        "rss_now_mb") for q in (None, "int4")}
    fp32 = measured[None]
    for q, r in measured.items():
        above, fp32_above = r["rss_now_mb"] - r["rss_import_mb"], fp32["rss_now_mb"] - fp32["rss_import_mb"]
        memory.add_row(f"tinyomni-world {q or 'float32'}", f"{r['rss_now_mb']:.0f}", f"{above:.0f}",
                       f"{r['rss_now_mb'] / fp32['rss_now_mb']:.2f}x ({above / fp32_above:.2f}x above import)")
    Console(width=140).print(memory)
    print(f"(targets: load() <= 1.5 s, one-shot chat <= 3 s wall, int4 RSS <= 0.4x float32; the cache used: {cache})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
