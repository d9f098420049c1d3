"""Where a quantized decode step's time goes: the whole step against its linears alone, in CPU time.

    python diagnostics/profile_decode_step.py --mode int4 --threads 1
    TINYOMNI_FUSED_DECODE=0 python diagnostics/profile_decode_step.py --mode int4 --threads 1   # eager layers

SmolLM2-135M, a 128-token prefill, then 10 × 5 decode steps around position 140; each figure the best
of 5 batches, in this process's CPU time (a loaded machine inflates it far less than wall time).
"The linears alone" calls every quantized linear of the model once on a random row (the per-call
Python cost included, so with the fused step on it can exceed the step); "rest" = step - linears:
norms, rotary, cache writes, attention, Python. With the fused step on, the C++ call alone (all 30
layers: their linears, attention, norms) is timed too, and "outside it" = step - that call - LM head:
the embedding lookup, rotary tables, final norm and Python around them. Use 1 thread: with more,
process CPU time also counts OpenMP's workers spinning while they wait for the next parallel part.
"""

from __future__ import annotations

import argparse
import time

import torch

import tinyomni
from tinyomni.engine import QuantLinear, fused, quantize_model
from tinyomni.model.decoder import CacheState


def best_ms(fn, batches: int = 5, per_batch: int = 10) -> float:
    times = []
    for _ in range(batches):
        start = time.process_time()
        for _ in range(per_batch):
            fn()
        times.append((time.process_time() - start) / per_batch * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["int8", "int4"], default="int4")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (its Q4_1 GGUF) or another SmolLM2 .gguf")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = tinyomni.load(args.model, dtype=dtype)
    quantize_model(model.model, args.mode)
    decoder = model.model.language_model
    kv = decoder.new_cache(1, 256)
    with torch.inference_mode():
        prompt = torch.randint(100, 4000, (1, 128), generator=torch.Generator().manual_seed(0))
        decoder(input_ids=prompt, cache=CacheState(kv, torch.arange(128), 128), logits_to_keep=1)
        token, slot = torch.tensor([[5]]), [128]

        def step() -> None:
            s = slot[0] = 128 + (slot[0] - 127) % 64  # stays within the cache
            decoder(input_ids=token, position_ids=torch.tensor([[s]]), cache=CacheState(kv, torch.tensor([s]), s + 1))

        for _ in range(10):
            step()
        whole = best_ms(step)
        linears = [m for m in decoder.modules() if isinstance(m, QuantLinear)]
        inputs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in linears]
        alone = best_ms(lambda: [m(x) for m, x in zip(linears, inputs)], per_batch=1)
        head_x = torch.randn(1, 1, decoder.lm_head.in_features, dtype=dtype)
        head = best_ms(lambda: decoder.lm_head(head_x))
        step_fn = decoder.decode_step
        on = step_fn is not None and not step_fn.why_not() and fused.enabled()
        stack_ms = None
        if on:
            x = decoder.embed(token)
            cos, sin = decoder.model.rotary_emb(torch.tensor([[140]]), dtype)
            cache = CacheState(kv, torch.tensor([140]), 141)
            stack_ms = best_ms(lambda: step_fn(x, cos, sin, None, cache))
    print(f"{args.mode}, {args.dtype}, {args.threads} thread(s), fused step {'on' if on else 'off'} "
          f"({fused.ENABLE_ENV}=0 turns it off), CPU ms per token:")
    print(f"  whole step {whole:.2f} ({1e3 / whole:.1f} tok/s); {len(linears)} linears alone {alone:.2f} "
          f"(LM head {head:.2f}); rest {whole - alone:.2f}")
    if stack_ms is not None:
        print(f"  the fused C++ call {stack_ms:.2f}, LM head {head:.2f}, outside them {whole - stack_ms - head:.2f}")


if __name__ == "__main__":
    main()
