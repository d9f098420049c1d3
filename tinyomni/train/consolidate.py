"""`python -m tinyomni.train.consolidate SRC DST`: a sharded (FSDP) training checkpoint as a full one.

    python -m tinyomni.train.consolidate runs/a/checkpoints/step-0000200 runs/b/checkpoints/step-0000200
    tinyomni train RECIPE --out runs/b --resume --set run.distributed=ddp     # one process (or DDP) goes on

Any process count resumes from either kind directly (see checkpoint.py); this writes the full weights
(weights.safetensors) and the optimizer state by parameter name (optimizer.pt) for one process to
read without torch.distributed, e.g. to inspect or to copy elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyomni.train.checkpoint import consolidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyomni.train.consolidate",
                                     description="write a sharded (FSDP) training checkpoint as a full one")
    parser.add_argument("src", help="a sharded checkpoint, e.g. runs/NAME/checkpoints/step-0000200")
    parser.add_argument("dst", help="where to write the full one (e.g. into another run folder's checkpoints/)")
    args = parser.parse_args(argv)
    print(consolidate(Path(args.src), Path(args.dst)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
