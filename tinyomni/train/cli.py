"""`tinyomni train RECIPE`: run a recipe (or continue it with --resume); under torchrun it uses DDP.

    tinyomni train recipes/toy.toml
    tinyomni train recipes/tinyomni-world.toml --resume
    tinyomni train recipes/toy.toml --set run.out=runs/try2 --set stages.0.steps=50
    torchrun --nproc_per_node 2 -m tinyomni.train.cli recipes/toy.toml     # DDP, 2 processes
    torchrun --nproc_per_node 2 -m tinyomni.train.cli recipes/toy-dpo.toml --set run.distributed=fsdp

`tinyomni distill`: SFT data with an OpenAI-compatible teacher's answers (train/distill.py).

    tinyomni distill --teacher https://api.openai.com --teacher-model gpt-4o-mini --data in.jsonl --out out.jsonl
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a recipe (TOML/YAML); DDP or FSDP under torchrun")
    add_arguments(p)
    p.set_defaults(func=run)
    d = subparsers.add_parser("distill", help="write SFT data with a teacher endpoint's answers (OpenAI-compatible)")
    add_distill_arguments(d)
    d.set_defaults(func=run_distill)


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="the endpoint: a base URL, a /v1 URL or the full "
                   "chat/completions URL")
    p.add_argument("--teacher-model", required=True, help="the model name the endpoint serves")
    p.add_argument("--data", required=True, help="input records: JSONL (world, chat messages, LLaVA) or a "
                   "LLaVA JSON list")
    p.add_argument("--out", required=True, help="output JSONL; an existing one is continued (resume)")
    p.add_argument("--image-folder", help="media paths in the input are relative to this (default: its folder)")
    p.add_argument("--api-key-env", help="the environment variable holding the API key (default: "
                   "TINYOMNI_API_KEY, then OPENAI_API_KEY); the key is never printed or written")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    p.add_argument("--retries", type=int, default=4, help="retries of a busy answer or a timeout, with "
                   "backoff (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="the longest answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="the teacher's sampling temperature")
    p.add_argument("--system", help="a system prompt the teacher sees (not written to the data)")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--skip-invalid", action="store_true", help="distil the other records when some cannot be "
                   "sent (a missing media file, an unreadable record)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_distill(args: argparse.Namespace) -> int:
    from tinyomni.train.distill import run as distill

    if args.concurrency < 1 or args.retries < 0 or args.max_tokens < 1:
        from tinyomni.errors import ConfigError

        raise ConfigError("--concurrency and --max-tokens must be >= 1, --retries >= 0")
    return distill(args)


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
