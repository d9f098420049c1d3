"""Batched decode steps, kernel level: the AMX int8 batched kernel (engine/kernels/batched) against the
VNNI GEMV it replaces for 2..16 rows, over every quantized linear of SmolLM2-135M (30 layers x 7
projections, random weights), same process, same inputs.

    python diagnostics/bench_batched_kernels.py                        # int4 and int8, 1 thread, CPU time
    python diagnostics/bench_batched_kernels.py --threads 2 --clock wall --bits 4
    python diagnostics/bench_batched_kernels.py --decode-step --bits 4   # the whole fused decode step

Each cell is the best of --repeats passes over the 210 linears (best-of, and CPU time with 1 thread by
default, because a shared machine inflates wall time unevenly). "gemv" calls the linears with
ops.use_batched(False); "batched" calls the batched kernel directly (the linears use it for M >= 2).
"vs M=1" is a step's cost over the one-row GEMV step's: what continuous batching pays for M streams.

--decode-step times the real thing instead: SmolLM2-135M (tinyomni.load("smollm2"), quantized with
quantize_model) decoding one token for M rows at once after a 64-token prefill, the fused decode
step with the batched kernel switched on and off (ops.use_batched); the LM head (float, tied to the
embedding) and attention are in it too.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from tinyomni.engine import ops
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref

# (out, in) per layer: q, k, v, o, gate, up, down.
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30


def best_ms(fn, clock, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best * 1e3


def sweep(call, weights, xs, passes: int) -> None:
    """One batched decode step's linears: call(x, qweight, scales, mins, K, N, passes) for each."""
    for q, s, m, K, N in weights:
        call(xs[K], q, s, m, K, N, passes)


def decode_steps(args: argparse.Namespace, clock) -> None:
    """The quantized decoder's batched decode step for M rows, the batched kernel on and off."""
    import tinyomni
    from tinyomni.engine import quantize_model
    from tinyomni.model.decoder import CacheState

    print(f"{'kind':5} {'M':>3} {'gemv step ms':>12} {'batched step ms':>15} {'speed-up':>8} "
          f"{'gemv vs M=1':>11} {'batched vs M=1':>14}")
    for bits in args.bits:
        model = tinyomni.load("smollm2")
        quantize_model(model.model, f"int{bits}")
        decoder = model.model.language_model
        one = None
        for M in args.rows:
            kv = decoder.new_cache(M, 256)
            prompt = torch.randint(100, 4000, (M, 64), generator=torch.Generator().manual_seed(0))
            token, slot = torch.full((M, 1), 5), [64]

            def step(M=M, kv=kv, token=token, slot=slot, decoder=decoder) -> None:
                for _ in range(5):
                    s = slot[0] = 64 + (slot[0] - 63) % 64  # stays within the cache
                    decoder(input_ids=token, position_ids=torch.full((M, 1), s),
                            cache=CacheState(kv, torch.tensor([s]), s + 1), logits_to_keep=1)

            with torch.inference_mode():
                decoder(input_ids=prompt, cache=CacheState(kv, torch.arange(64), 64), logits_to_keep=1)
                times = {}
                for name, on in (("old", False), ("new", True)):
                    ops.use_batched(on)
                    times[name] = best_ms(step, clock, args.repeats) / 5
            one = times["old"] if M == 1 or one is None else one
            print(f"int{bits:<2} {M:3d} {times['old']:12.2f} {times['new']:15.2f} {times['old'] / times['new']:7.2f}× "
                  f"{times['old'] / one:10.2f}× {times['new'] / one:13.2f}×", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="activation rows M")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-step", action="store_true", help="time SmolLM2's fused decode step instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if not ops.using_extension() or not ops.extension().batched_supported():
        raise SystemExit(f"the batched kernel is not available: {ops.batched_path()}")
    ext = ops.extension()
    print(f"batched path: {ops.batched_path()}; {args.threads} thread(s), {args.clock} clock, "
          f"load average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.decode_step:
        return decode_steps(args, clock)
    print(f"{'kind':5} {'passes':>6} {'M':>3} {'gemv ms':>8} {'batched ms':>10} {'speed-up':>8} "
          f"{'gemv vs M=1':>11} {'batched vs M=1':>14}")
    torch.manual_seed(0)
    for bits in args.bits:
        ref = int4_ref if bits == 4 else int8_ref
        linear = ext.int4_linear if bits == 4 else ext.int8_linear

        def gemv(x, q, s, m, K, N, passes, linear=linear):
            return linear(x, q, s, m, None, K, N, passes)

        def batched(x, q, s, m, K, N, passes, bits=bits):
            return ext.batched_linear(x, q, s, m, None, K, N, bits, passes)

        weights = [(*ref.quantize(torch.randn(N, K) * 0.05), K, N) for _ in range(LAYERS) for N, K in LAYER]
        for passes in args.passes:
            one = None
            for M in args.rows:
                xs = {K: torch.randn(M, K) for K in {K for _, K in LAYER}}
                ops.use_batched(False)
                times = {"old": best_ms(functools.partial(sweep, gemv, weights, xs, passes), clock, args.repeats)}
                ops.use_batched(True)
                times["new"] = best_ms(functools.partial(sweep, batched, weights, xs, passes), clock, args.repeats)
                one = times["old"] if M == 1 or one is None else one
                print(f"int{bits:<2} {passes:6d} {M:3d} {times['old']:8.2f} {times['new']:10.2f} "
                      f"{times['old'] / times['new']:7.2f}× {times['old'] / one:10.2f}× {times['new'] / one:13.2f}×",
                      flush=True)


if __name__ == "__main__":
    main()
