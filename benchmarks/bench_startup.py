"""Start-up: how long until a model can answer, and what a one-shot `tinyomni chat` costs, cold and warm.

Each measurement runs in a fresh Python process (what a user's command pays), in one run, so the
ratios compare like with like on a shared machine:

- `load()` of the default model (tinyomni-world: the SmolLM2 GGUF dequantized, its LoRA adapter
  merged) with the load cache off (every load builds), then with a warm cache (one safetensors read);
- the same for `load("smollm2")`, next to transformers reading the same GGUF (`from_pretrained(...,
  gguf_file=...)`: it dequantizes too) as the reference;
- `tinyomni chat "What is the capital of France?"` end to end (interpreter, imports, load, answer),
  cold and warm; and each process's peak resident memory.

    python benchmarks/bench_startup.py            # about two minutes on 2 idle cores
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
t0 = time.perf_counter()
import {module}
t1 = time.perf_counter()
{statement}
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
TINYOMNI = ("tinyomni", "tinyomni.load({spec!r})")
TRANSFORMERS = ("transformers", "import pathlib; from tinyomni.checkpoints.gguf import smollm2_gguf_path; "
                "p = smollm2_gguf_path(); transformers.AutoModelForCausalLM.from_pretrained("
                "str(p.parent), gguf_file=p.name)")


def python(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def chat(env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a one-shot `tinyomni chat`."""
    start = time.perf_counter()
    code = ("import resource, sys; from tinyomni.cli import main; rc = main(['chat', "
            "'What is the capital of France?', '--no-stream']); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, float(out.stderr.strip().splitlines()[-1])


def best(runs: list[dict], key: str) -> dict:
    return min(runs, key=lambda r: r[key])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the best is shown")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    cache = tempfile.mkdtemp(prefix="tinyomni-bench-cache-")
    cold = {**os.environ, "TINYOMNI_CACHE": "off"}
    warm = {**os.environ, "TINYOMNI_CACHE": cache}
    rows = []
    for spec in ("tinyomni-world", "smollm2"):
        module, statement = TINYOMNI
        code = LOAD.format(module=module, statement=statement.format(spec=spec))
        built = best([python(code, cold) for _ in range(args.repeat)], "load")
        python(code, warm)  # fills the cache
        cached = best([python(code, warm) for _ in range(args.repeat)], "load")
        rows.append((f"load({spec!r}), building", built))
        rows.append((f"load({spec!r}), from the cache", cached))
    reference = None
    if not args.no_transformers:
        module, statement = TRANSFORMERS
        reference = best([python(LOAD.format(module=module, statement=statement), cold)
                          for _ in range(args.repeat)], "load")
        rows.append(("transformers from_pretrained(SmolLM2 GGUF)", reference))

    table = Table(title="start-up (each row a fresh process)")
    for column in ("what", "import s", "load s", "peak RSS MB", "load vs transformers"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for name, r in rows:
        ratio = f"{reference['load'] / r['load']:.1f}x faster" if reference and "transformers" not in name else ""
        table.add_row(name, f"{r['import']:.2f}", f"{r['load']:.2f}", f"{r['rss_mb']:.0f}", ratio)
    cold_chat = min((chat(cold) for _ in range(args.repeat)), key=lambda c: c[0])
    warm_chat = min((chat(warm) for _ in range(args.repeat)), key=lambda c: c[0])
    table.add_row("tinyomni chat one-shot, building", "", f"{cold_chat[0]:.2f} wall", f"{cold_chat[1]:.0f}", "")
    table.add_row("tinyomni chat one-shot, from the cache", "", f"{warm_chat[0]:.2f} wall", f"{warm_chat[1]:.0f}",
                  f"{cold_chat[0] / warm_chat[0]:.1f}x faster than building")
    Console(width=130).print(table)
    print(f"(targets: load() <= 1.5 s, one-shot chat <= 3 s wall; the cache used: {cache})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
