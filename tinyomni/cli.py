"""The `tinyomni` command: chat | info, plus world | train | eval | serve from their own packages.

    tinyomni chat "What is the capital of France?"
    tinyomni chat --image photo.jpg --audio question.wav "Answer the question about the picture."
    tinyomni chat                      # interactive: /image PATH, /audio PATH, /video PATH, /reset, /quit
    tinyomni info --image-size 1024x768
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tinyomni.errors import TinyOmniError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    try:
        return args.func(args)
    except TinyOmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyomni", description="Small omni-modal language models on a CPU.")
    sub = parser.add_subparsers(metavar="COMMAND")

    chat = sub.add_parser("chat", help="chat with a model (one question, or interactive without one)")
    add_model_options(chat)
    chat.add_argument("prompt", nargs="?", help="the question; leave out for an interactive session")
    chat.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="a video file or GIF (repeatable)")
    chat.add_argument("--audio", action="append", default=[], help="an audio file (repeatable)")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--max-tiles", type=int, help="cap the tiles per image (fewer tokens, faster)")
    add_sampling_options(chat)
    chat.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    chat.set_defaults(func=run_chat)

    info = sub.add_parser("info", help="parameters per part, context length, tokens per image")
    add_model_options(info)
    info.add_argument("--image-size", help="WIDTHxHEIGHT: how many tiles and tokens such an image costs")
    info.set_defaults(func=run_info)

    # Each of these lives with the code it drives; a missing one is a broken install, not optional.
    from tinyomni.eval import cli as eval_cli
    from tinyomni.serve import cli as serve_cli
    from tinyomni.train import cli as train_cli
    from tinyomni.world import cli as world_cli

    world_cli.register(sub)
    train_cli.register(sub)
    eval_cli.register(sub)
    serve_cli.register(sub)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="'tinyomni-world' (the reference model, default), a checkpoint directory, "
                             "'smollm2' (untrained encoders), a .gguf file, a HF directory or a hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations (bfloat16 is faster on CPUs with AMX/AVX-512-BF16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": args.stop}


def load_model(args: argparse.Namespace):
    from rich.console import Console

    from tinyomni import api

    with Console(stderr=True).status(f"loading {args.model or api.DEFAULT_MODEL} ..."):
        return api.load(args.model, device=args.device, dtype=args.dtype)


def media_parts(images: list[str], videos: list[str], audios: list[str]) -> list[dict[str, Any]]:
    return ([{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
            + [{"type": "audio", "audio": p} for p in audios])


def stream_answer(model, messages: list[dict[str, Any]], args: argparse.Namespace) -> str:
    sampling = sampling_from_args(args)
    has_media = any(isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"])
                    for m in messages)
    if has_media and not model.encoders_trained:
        print(f"note: {model.name}'s image and audio encoders are untrained, so answers about media are "
              "not meaningful; use a trained checkpoint with --model", file=sys.stderr)
    if args.no_stream:
        text = model.chat(messages, max_tiles=args.max_tiles, **sampling)
        print(text)
        return text
    pieces = []
    for delta in model.chat(messages, stream=True, max_tiles=args.max_tiles, **sampling):
        pieces.append(delta)
        print(delta, end="", flush=True)
    print()
    return "".join(pieces)


def run_chat(args: argparse.Namespace) -> int:
    model = load_model(args)
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    pending = media_parts(args.image, args.video, args.audio)
    if args.prompt is not None:
        history.append({"role": "user", "content": pending + [{"type": "text", "text": args.prompt}]})
        stream_answer(model, history, args)
        return 0
    return interactive(model, history, pending, args)


HELP = """commands: /image PATH  /video PATH  /audio PATH  attach to the next message
          /reset  start over     /quit  leave (or Ctrl-D)"""


def interactive(model, history: list[dict[str, Any]], pending: list[dict[str, Any]],
                args: argparse.Namespace) -> int:
    system = list(history)
    print(f"tinyomni chat with {model.name}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, value = line.partition(" ")
            value = value.strip()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history[:] = list(system)
                pending.clear()
                print("(conversation reset)", file=sys.stderr)
            elif command in ("/image", "/video", "/audio") and value:
                kind = command[1:]
                pending.append({"type": kind, kind: value})
                print(f"({kind} attached to your next message: {value})", file=sys.stderr)
            else:
                print(HELP, file=sys.stderr)
            continue
        message = {"role": "user", "content": pending + [{"type": "text", "text": line}]}
        try:
            print("assistant> ", end="", flush=True)
            answer = stream_answer(model, history + [message], args)
        except TinyOmniError as e:  # a bad attachment should not end the session
            print(f"\nerror: {e}", file=sys.stderr)
            pending.clear()
            continue
        history += [message, {"role": "assistant", "content": answer}]
        pending.clear()


def run_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    size = None
    if args.image_size:
        try:
            w, h = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            print(f"error: --image-size must look like 1024x768, got {args.image_size!r}", file=sys.stderr)
            return 2
        size = (w, h)
    model = load_model(args)
    facts = model.info(size)
    table = Table(title=f"tinyomni model: {facts['name']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for part, count in facts["parameters"].items():
        table.add_row(f"parameters: {part}", f"{count / 1e6:.2f} M")
    table.add_row("parameters: total", f"{sum(facts['parameters'].values()) / 1e6:.2f} M")
    table.add_row("context length", f"{facts['context_length']} tokens")
    table.add_row("dtype", facts["dtype"])
    if "tile_size" in facts:
        table.add_row("image tile", f"{facts['tile_size']} px, {facts['tokens_per_tile']} tokens")
        thumbnail = " (+ a thumbnail when tiled)" if facts["use_thumbnail"] else ""
        table.add_row("max tiles per image", f"{facts['max_tiles']}{thumbnail}")
    if "image" in facts:
        image = facts["image"]
        table.add_row(f"image {image['size'][0]}x{image['size'][1]}",
                      f"{image['tiles']} tiles, {image['tokens']} tokens")
    if "audio_tokens_per_second" in facts:
        table.add_row("audio", f"{facts['audio_tokens_per_second']} tokens/s, "
                               f"at most {facts['max_audio_seconds']:.0f} s")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
