"""How close the one-row (decode) matrix-vector kernels come to the memory: GB/s on SmolLM2's shapes.

    python diagnostics/gemv_bandwidth.py --threads 1
    python diagnostics/gemv_bandwidth.py --threads 2 --bits 4 --passes 1 2 --shapes

SmolLM2-135M's 30 layers of 7 linears as random weights (66 MB in int4, 119 MB in int8) called in
decode order, so every call reads its weight from L3 or memory as a decode step does; with --shapes
also each shape alone (its 30 layers' copies) and the 49152x576 LM head. Every weight is called once
per round; a figure is the sum over weights of each one's fastest call (robust to a loaded machine,
where some calls get preempted), so it is the kernels' speed when they run, each call's Python and
activation quantization included (a few µs). "read" is a torch sum over as many bytes: what a
streaming loop gets here at the same moment.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from tinyomni.engine import ops
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
SHAPES = {"q/o 576x576": (576, 576, 2), "k/v 192x576": (192, 576, 2), "gate/up 1536x576": (1536, 576, 2),
          "down 576x1536": (576, 1536, 1), "LM head 49152x576": (49152, 576, 0)}  # (out, in, copies per layer)


def fastest(calls: list[Callable[[], object]], rounds: int) -> float:
    """Sum over calls of each one's fastest wall time over `rounds` rounds of calling all in turn."""
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return sum(best)


def make(bits: int, shapes: list[tuple[int, int]]) -> tuple[list[tuple], int]:
    """Random weights of these (out, in) shapes in `bits`-bit blocks, and their bytes."""
    ref = int4_ref if bits == 4 else int8_ref
    made = [(*ref.quantize(torch.randn(out, inp)), out, inp) for out, inp in shapes]
    return made, sum(q.numel() + 2 * s.numel() + 2 * m.numel() for q, s, m, _, _ in made)


def row(label: str, bits: int, made: list[tuple], nbytes: int, passes: list[int], rounds: int) -> str:
    ext = ops.extension()
    kernel = ext.int4_linear if bits == 4 else ext.int8_linear
    inputs = {inp: torch.randn(1, inp) for _, _, _, _, inp in made}
    flat = torch.empty(nbytes // 4).uniform_()
    cells = [f"read {nbytes / fastest([flat.sum], rounds) / 1e9:5.1f}"]
    for p in passes:
        calls = [lambda q=q, s=s, m=m, o=o, i=i, p=p: kernel(inputs[i], q, s, m, None, i, o, p)
                 for q, s, m, o, i in made]
        t = fastest(calls, rounds)
        cells.append(f"{p}-pass {nbytes / t / 1e9:5.1f} ({t * 1e3:.2f} ms)")
    return f"int{bits} {label:22s} {nbytes / 1e6:6.1f} MB  " + "  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shapes", action="store_true", help="also each shape alone, and the LM head")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if ops.extension() is None:
        raise SystemExit(f"the C++ kernels are not in use: {ops.kernel_path()}")
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; GB/s (time for all the weights)")
    for bits in args.bits:
        made, nbytes = make(bits, LAYER * 30)
        print(row("30 layers in order", bits, made, nbytes, args.passes, args.rounds), flush=True)
        del made
        for label, (out, inp, per_layer) in SHAPES.items() if args.shapes else ():
            made, nbytes = make(bits, [(out, inp)] * max(1, 30 * per_layer))
            print(row(label, bits, made, nbytes, args.passes, args.rounds), flush=True)
            del made


if __name__ == "__main__":
    main()
