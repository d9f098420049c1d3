"""`tinyomni embed`: images, texts or speech → L2-normalised vectors from a dual encoder.

    tinyomni embed --model path/to/clip --image a.png --image b.png --out images.npy
    tinyomni embed --model runs/toy/checkpoints/step-0000006 --text "A small red circle." --out t.jsonl

Without --out the vectors are printed as JSON lines ({"input": ..., "embedding": [...]}); `.npy` writes
one [N, D] float32 array, `.jsonl` the same lines into a file. Nothing heavy is imported until it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinyomni.errors import InputError

HELP = "embed images, texts or speech with a dual encoder (CLIP, SigLIP, contrastive towers)"
OUTPUTS = (".npy", ".jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help=HELP, description=HELP)
    p.add_argument("--model", required=True, help="a CLIP / SigLIP directory, a tinyomni model with towers.json, "
                                                  "or a training checkpoint of a contrastive stage")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", action="append", help="an image file (repeatable)")
    what.add_argument("--text", action="append", help="a text (repeatable)")
    what.add_argument("--audio", action="append", help="an audio file (repeatable)")
    p.add_argument("--space", default="image", choices=["image", "audio"],
                   help="for --text with a tinyomni model: the pair whose text tower embeds it (default image)")
    p.add_argument("--out", "-o", help="write the vectors to a .npy or .jsonl file instead of printing them")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in OUTPUTS:
        raise InputError(f"--out {out}: use a {' or '.join(OUTPUTS)} file")
    for files in (args.image, args.audio):
        for f in files or []:
            if not Path(f).is_file():
                raise InputError(f"file not found: {f}")
    from tinyomni import retrieval

    encoder = retrieval.load(args.model, device=args.device)
    kind, inputs = next((k, v) for k, v in (("image", args.image), ("text", args.text), ("audio", args.audio)) if v)
    vectors = encoder.embed(**{kind: list(inputs)}, space=args.space).numpy()
    if out is not None and out.suffix == ".npy":
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, vectors)
    else:
        lines = "".join(json.dumps({"kind": kind, "input": x, "embedding": [round(float(v), 7) for v in row]}) + "\n"
                        for x, row in zip(inputs, vectors))
        if out is None:
            sys.stdout.write(lines)
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(lines)
    print(f"{len(vectors)} {kind} embedding(s) of dimension {vectors.shape[1]} in {out}", file=sys.stderr)
    return 0
