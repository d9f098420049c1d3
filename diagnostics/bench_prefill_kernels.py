"""Prefill's quantized linears, kernel level: the AMX GEMM (engine/kernels/gemm) against the dequantize +
matmul path it replaces, on SmolLM2-135M's shapes, same process, same inputs.

    python diagnostics/bench_prefill_kernels.py                       # M 16 128 512, 1 thread, CPU time
    python diagnostics/bench_prefill_kernels.py --rows 128 --threads 2 --clock wall

Each cell is the best of --repeats timings of a ~50 ms loop (best-of, and CPU time with 1 thread by
default, because a shared machine inflates wall time unevenly). "old" calls the same linear with
ops.use_gemm(False); the speed-up column is old / new.
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

# (in, out): q/o, k/v, gate/up, down, the LM head (prefill computes logits for the last position only,
# so the head meets M > 1 rows only in batched prompts).
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]


def best_ms(fn, clock, repeats: int, budget: float = 0.05) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start, n = clock(), 0
        while clock() - start < budget or n == 0:
            fn()
            n += 1
        best = min(best, (clock() - start) / n)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16 + 1, 128, 512], help="activation rows M")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-head", action="store_true", help="skip the 576→49152 LM head (slow on the old path)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if not ops.using_extension():
        raise SystemExit(f"the C++ kernels are not in use: {ops.kernel_path()}")
    print(f"prefill path: {ops.prefill_path()}; {args.threads} thread(s), {args.clock} clock, "
          f"load average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'kind':5} {'in→out':>12} {'M':>4} {'dtype':>9} {'old ms':>8} {'new ms':>8} {'speed-up':>8} "
          f"{'new GFLOP/s':>11}")
    torch.manual_seed(0)
    for kind, ref in (("int4", int4_ref), ("int8", int8_ref)):
        kernel = ops.extension().int4_linear if kind == "int4" else ops.extension().int8_linear
        for K, N in SHAPES:
            if args.no_head and N > 10000:
                continue
            q, s, m = ref.quantize(torch.randn(N, K) * 0.05)
            for M in args.rows:
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(M, K).to(dtype)
                    times = {}
                    for name, on in (("old", False), ("new", True)):
                        ops.use_gemm(on)
                        call = functools.partial(kernel, x, q, s, m, None, K, N, 2)
                        times[name] = best_ms(call, clock, args.repeats)
                    ops.use_gemm(True)
                    flops = 2 * M * K * N / (times["new"] * 1e-3) / 1e9
                    print(f"{kind:5} {f'{K}→{N}':>12} {M:4d} {str(dtype)[6:]:>9} {times['old']:8.3f} "
                          f"{times['new']:8.3f} {times['old'] / times['new']:7.2f}× {flops:11.0f}", flush=True)


if __name__ == "__main__":
    main()
