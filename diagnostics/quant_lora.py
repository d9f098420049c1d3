"""tinyomni-world quantized with its LoRA adapter kept apart (engine/lora.py) against the old way
(adapter merged, then int4 asked for: the changed weights fell back to int8) and the float model:
load time from the load cache, process RSS, decode tok/s, and logits' relative error vs float.

    python diagnostics/quant_lora.py                       # every variant, each in its own process
    python diagnostics/quant_lora.py --threads 1 --clock cpu    # on a loaded machine

Each variant runs in a fresh process (so RSS, read after generating, is its own; "model MB" is that
less the process's RSS before loading, torch's libraries mostly). The first load, in a process of
its own, fills a private load cache (TINYOMNI_CACHE, default a temporary folder); the measured one
reads it, as a user's second `tinyomni.load` would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence why the sky is blue."]
VARIANTS = {
    "float32": "the float model, adapter merged",
    "int4+lora": "load(quantize='int4'): the GGUF's int4 blocks, the adapter apart in float",
    "int8+lora": "load(quantize='int8'): the GGUF's blocks in int8, the adapter apart in float",
    "int4-merged (old)": "adapter merged, then quantize_model('int4'): changed weights fall back to int8",
}


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), MB; mmap'd weights count once touched."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(variant: str):
    import tinyomni
    from tinyomni.engine import quantize_model

    if variant == "float32":
        return tinyomni.load("tinyomni-world")
    if variant.endswith("+lora"):
        return tinyomni.load("tinyomni-world", quantize=variant.split("+")[0])
    model = tinyomni.load("tinyomni-world")  # merged, as before this change
    quantize_model(model.model, "int4")
    model.quantization = "int4"
    return model


def child(variant: str, new: int, out: Path, clock=time.perf_counter) -> None:
    import torch

    from tinyomni.engine import describe
    from tinyomni.generate import Generation, SamplingParams
    from tinyomni.processing.chat import Prompt

    base_rss = rss_mb()
    if variant != "int4-merged (old)":  # (the old way quantizes after the load, never cached)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import quant_lora; quant_lora.load({variant!r})"], check=True)  # fill the cache
    start = time.perf_counter()
    model = load(variant)
    load_s = time.perf_counter() - start
    logits = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = torch.tensor([model.prepare(text).input_ids])
            logits.append(model.model.language_model(input_ids=ids)[0][0].float())
    answer = model.chat(PROMPTS[0], max_new_tokens=16)
    ids = model.tokenizer.encode("The history of the city goes back many centuries, and " * 8)[:128]
    rates = []
    for _ in range(3):
        generation = Generation(model.model, model.tokenizer, [Prompt(ids)],
                                SamplingParams(max_new_tokens=new, ignore_eos=True), model.suppress_ids)
        first = None
        for _ in generation:
            if first is None:
                first = clock()
        rates.append((generation.completions[0].completion_tokens - 1) / (clock() - first))
    rates.sort()
    rss = rss_mb()  # after generating: every weight has been read (an mmap'd one is resident only then)
    torch.save(logits, out / f"{variant}.pt")
    (out / f"{variant}.json").write_text(json.dumps({
        "load_s": load_s, "rss_mb": rss, "rss_model_mb": rss - base_rss, "decode_tok_s": rates[1],
        "answer": answer, "weights": describe(model.model.language_model),
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="decode tok/s by wall time, or by this process's CPU time (steadier under load)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.new, Path(args.out), time.process_time if args.clock == "cpu" else time.perf_counter)
        return 0
    import torch

    out = Path(tempfile.mkdtemp(prefix="quant-lora-"))
    env = {**os.environ, "TINYOMNI_CACHE": os.environ.get("TINYOMNI_CACHE") or str(out / "cache")}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, "--out", str(out), "--new", str(args.new),
               "--clock", args.clock]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env=env)
    reference = torch.load(out / "float32.pt") if (out / "float32.pt").exists() else None
    fp32_rss = None
    print(f"{'variant':20} {'load s':>7} {'RSS MB':>7} {'x fp32':>6} {'model MB':>8} {'x fp32':>6} "
          f"{'decode tok/s':>12} {'logits rel err':>14}  answer")
    for variant in args.variants:
        facts = json.loads((out / f"{variant}.json").read_text())
        if variant == "float32":
            fp32_rss = facts["rss_model_mb"], facts["rss_mb"]
        error = float("nan")
        if reference is not None:
            logits = torch.load(out / f"{variant}.pt")
            error = max(((a - b).norm() / b.norm()).item() for a, b in zip(logits, reference))
        ratio, whole = (facts["rss_model_mb"] / fp32_rss[0], facts["rss_mb"] / fp32_rss[1]) if fp32_rss else (0, 0)
        print(f"{variant:20} {facts['load_s']:7.2f} {facts['rss_mb']:7.0f} {whole:6.2f} {facts['rss_model_mb']:8.0f} "
              f"{ratio:6.2f} "
              f"{facts['decode_tok_s']:12.1f} {error:14.4f}  {facts['answer']!r}")
    print(f"(results in {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
