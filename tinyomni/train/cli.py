"""`tinyomni train RECIPE`: run a recipe (or continue it with --resume); under torchrun it uses DDP.

    tinyomni train recipes/toy.toml
    tinyomni train recipes/tinyomni-world.toml --resume
    tinyomni train recipes/toy.toml --set run.out=runs/try2 --set stages.0.steps=50
    torchrun --nproc_per_node 2 -m tinyomni.train.cli recipes/toy.toml     # DDP, 2 processes
    torchrun --nproc_per_node 2 -m tinyomni.train.cli recipes/toy-dpo.toml --set run.distributed=fsdp
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a recipe (TOML/YAML); DDP or FSDP under torchrun")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe file (see recipes/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out")
    p.add_argument("--out", help="run folder (overrides run.out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. stages.0.steps=10 (repeatable; values are TOML)")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many global steps")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")


def run(args: argparse.Namespace) -> int:
    from tinyomni.train.recipe import load_recipe
    from tinyomni.train.trainer import train

    overrides = list(args.set) + ([f'run.out="{args.out}"'] if args.out else [])
    recipe = load_recipe(args.recipe, overrides)
    result = train(recipe, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                   device=args.device)
    if result.model_dir is not None:
        print(f"model written to {result.model_dir}")
    elif result.global_step and args.stop_after:
        print(f"stopped after {result.global_step} steps; continue with --resume")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m tinyomni.train.cli` (e.g. under torchrun)."""
    from tinyomni.errors import TinyOmniError

    parser = argparse.ArgumentParser(prog="tinyomni train")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except TinyOmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
