"""The `tinyomni` command: chat | info | quantize | export, plus world | train | eval | serve from their own packages.

    tinyomni chat "What is the capital of France?"
    tinyomni chat --image photo.jpg --audio question.wav "Answer the question about the picture."
    tinyomni chat                      # interactive: /image PATH, /audio PATH, /video PATH, /reset, /quit
    tinyomni info --image-size 1024x768
    tinyomni quantize tinyomni-world --bits 4 --out world-int4   # then: tinyomni chat --model world-int4
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from tinyomni.errors import TinyOmniError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top-level parser has no options of its own but -h: the first other word is the command.
    parser = build_parser(command=next((a for a in argv if not a.startswith("-")), ""))
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


# Commands that live with the code they drive: name -> (module with `register(subparsers)`, help line).
# A module is imported only when its command runs (the server alone pulls in fastapi and uvicorn, the
# trainer and evaluator more: seconds a one-shot `tinyomni chat` should not pay); `tinyomni --help`
# lists them from here (tests/test_cli.py checks each line is the one its module registers).
COMMANDS = {
    "world": ("tinyomni.world.cli", "the synthetic multimodal world: generate, preview, bench"),
    "train": ("tinyomni.train.cli", "train a model from a recipe (TOML/YAML); DDP or FSDP under torchrun"),
    "distill": ("tinyomni.train.cli", "write SFT data with a teacher endpoint's answers (OpenAI-compatible)"),
    "eval": ("tinyomni.eval.cli", "evaluate a model or endpoint on task files (or world-bench)"),
    "serve": ("tinyomni.serve.cli", "OpenAI-compatible server and web chat page"),
    "embed": ("tinyomni.retrieval.cli",
              "embed images, texts or speech with a dual encoder (CLIP, SigLIP, contrastive towers)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser. `command`: the sub-command about to run; only its module among COMMANDS is
    imported (the others appear by their help line). None imports every one (a complete parser)."""
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

    quantize = sub.add_parser("quantize", help="write a quantized (int8/int4) checkpoint that loads as it is",
                              description="Quantize a model's decoder (LM head included) to the engine's weight-only "
                                          "int8 or int4 blocks once, and write it as a checkpoint directory: "
                                          "`--model DIR` (chat, serve, eval, info) and tinyomni.load(DIR) then read "
                                          "the blocks straight from the file, with no float copy and no quantizing.")
    quantize.add_argument("model", help="'tinyomni-world', a checkpoint directory, 'smollm2', ... (as --model)")
    quantize.add_argument("--bits", type=int, choices=[4, 8], required=True, help="4 (int4) or 8 (int8)")
    quantize.add_argument("--out", required=True, help="the checkpoint directory to write")
    quantize.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                          help="the float parts left (norms, vision and audio towers) (default: %(default)s)")
    quantize.set_defaults(func=run_quantize)

    export = sub.add_parser("export", help="write a model where other tools run it (GGUF, transformers)",
                            description="Export a model: --to gguf writes its text decoder, tokenizer and "
                                        "chat template as one GGUF file for llama.cpp and its peers (with "
                                        "--mmproj also its vision side as llama.cpp's mmproj file); --to hf "
                                        "writes a transformers InternVL directory (InternVLForConditionalGeneration), "
                                        "or with --text-only its decoder as a Llama/Qwen2 one (docs/models.md).")
    export.add_argument("model", help="'tinyomni-world', a checkpoint directory, 'smollm2', ... (as --model)")
    export.add_argument("--to", choices=["gguf", "hf"], default="gguf", help="the format (default: %(default)s)")
    export.add_argument("--out", required=True, help="the file (gguf) or directory (hf) to write")
    export.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                        help="the type of the weight matrices (gguf default f16, norms stay f32; hf default: "
                             "as loaded, f32)")
    export.add_argument("--mmproj", metavar="FILE", default=None,
                        help="gguf: also write the vision tower and projector as an mmproj GGUF "
                             "(llama-mtmd-cli -m OUT --mmproj FILE); matrices f32 with --outtype f32, else f16")
    export.add_argument("--text-only", action="store_true",
                        help="hf: write the text decoder alone (LlamaForCausalLM / Qwen2ForCausalLM), e.g. for a "
                             "model whose vision tower InternVL cannot hold")
    export.set_defaults(func=run_export)

    running = COMMANDS.get(command or "", ("",))[0]
    for name, (module, help_line) in COMMANDS.items():
        if name in sub.choices:  # registered along with another command of its module
            continue
        if command is None or module == running:  # a missing module is a broken install, not optional
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)  # listed; never run (main builds anew)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="'tinyomni-world' (the reference model, default), a checkpoint directory, "
                             "'smollm2' (untrained encoders), a .gguf file, a HF directory or a hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations (bfloat16 is faster on CPUs with AMX/AVX-512-BF16)")
    parser.add_argument("--encoder-dtype", default=None, choices=["float32", "bfloat16"],
                        help="the vision/audio towers' dtype, if not --dtype (bfloat16 towers in front of a "
                             "float32 or --quantize decoder: faster image encoding on CPUs with AMX)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only int8/int4 decoder (the engine's CPU kernels: faster decode, less memory)")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Sampling flags; each left out takes the model's default (its generation_config.json, else
    tinyomni's: greedy, 256 new tokens, loops stopped after 32 repeated tokens)."""
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--max-repeat-tokens", type=int, default=None,
                        help="stop an answer that repeats one phrase for this many tokens (0 = never)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given on the command line, checked (a bad one is an error naming it)."""
    from tinyomni.generate import SamplingParams

    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
             "max_repeat_tokens": args.max_repeat_tokens, "seed": args.seed, "stop": args.stop}
    given = {k: v for k, v in given.items() if v is not None}
    SamplingParams(**given).validate()  # before the model loads, not seconds later
    return given


def load_model(args: argparse.Namespace):
    from rich.console import Console

    from tinyomni import api

    with Console(stderr=True).status(f"loading {args.model or api.DEFAULT_MODEL} ..."):
        return api.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                        encoder_dtype=args.encoder_dtype)


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
    sampling_from_args(args)
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
    if "quantization" in facts:
        table.add_row("decoder weights", f"{facts['quantization']} (weight-only, the engine's kernels)")
        for what, path in facts["engine"].items():
            table.add_row(f"engine: {what}", path)
    if "encoder_dtype" in facts:
        table.add_row("encoders dtype", facts["encoder_dtype"])
    if "tile_size" in facts:
        table.add_row("image tile", f"{facts['tile_size']} px, {facts['tokens_per_tile']} tokens")
        note = " (+ a thumbnail when tiled)" if facts["use_thumbnail"] else ""
        if "grid_pinpoints" in facts:  # LLaVA-NeXT: the whole image + a grid at the best of these resolutions
            note = f" (the whole image + a grid of up to {facts['max_tiles'] - 1})"
            table.add_row("grid resolutions (WxH)", ", ".join(f"{w}x{h}" for h, w in facts["grid_pinpoints"]))
        table.add_row("max tiles per image", f"{facts['max_tiles']}{note}")
    if "image" in facts:
        image = facts["image"]
        table.add_row(f"image {image['size'][0]}x{image['size'][1]}",
                      f"{image['tiles']} tiles, {image['tokens']} tokens")
    if "audio_tokens_per_second" in facts:
        table.add_row("audio", f"{facts['audio_tokens_per_second']} tokens/s, "
                               f"at most {facts['max_audio_seconds']:.0f} s")
    Console().print(table)
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyomni import api
    from tinyomni.engine import describe

    mode = f"int{args.bits}"
    console = Console(stderr=True)
    with console.status(f"loading {args.model} and quantizing it to {mode} ..."):
        model = api.load(args.model, dtype=args.dtype, quantize=mode)
    with console.status(f"writing {args.out} ..."):
        path = model.save(args.out)
    facts = describe(model.model)
    layers = ", ".join(f"{facts[f'{k} layers']} {k}" for k in ("int4", "int8") if f"{k} layers" in facts)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    console.print(f"wrote {path} ({size:,.1f} MiB; {layers} layers); load it with --model {path}", markup=False,
                  highlight=False)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyomni import api

    if args.to == "gguf" and args.text_only:
        print("error: --text-only is for --to hf (a GGUF file holds the text decoder alone anyway)", file=sys.stderr)
        return 2
    if args.to == "hf" and args.mmproj:
        print("error: --mmproj is for --to gguf (llama.cpp's vision file)", file=sys.stderr)
        return 2
    if args.to == "hf" and args.outtype == "q8_0":
        print("error: --to hf writes f32, f16 or bf16 weights, not q8_0", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    with console.status(f"loading {args.model} ..."):
        model = api.load(args.model)
    if args.to == "hf":
        from tinyomni.checkpoints.export_hf import export_hf

        dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(args.outtype or "")
        with console.status(f"writing {args.out} ..."):
            path = export_hf(model, args.out, text_only=args.text_only, weights_dtype=dtype,
                             note=lambda line: console.print(f"note: {line}", markup=False, highlight=False))
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        what = ("the text decoder (AutoModelForCausalLM)" if args.text_only
                else "an InternVL model (AutoModelForImageTextToText + InternVLProcessor)")
        console.print(f"wrote {path} ({size:,.1f} MiB): {what}; transformers loads it as it is", markup=False)
        return 0
    from tinyomni.checkpoints.export_gguf import export_gguf

    outtype = args.outtype or "f16"
    if args.mmproj:
        from tinyomni.checkpoints.export_mmproj import mmproj_problems
        from tinyomni.errors import InputError

        problems = mmproj_problems(model.config)  # refused before either file is written
        if problems:
            raise InputError(f"{model.name} cannot be written as a llama.cpp mmproj: {'; '.join(problems)}")
    with console.status(f"writing {args.out} ({outtype}) ..."):
        path = export_gguf(model, args.out, outtype)
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB): the text decoder, tokenizer and chat "
                  "template; llama.cpp runs it as it is")
    if args.mmproj:
        from tinyomni.checkpoints.export_mmproj import export_mmproj, projector_type

        mm_type = "f32" if outtype == "f32" else "f16"
        with console.status(f"writing {args.mmproj} ({mm_type}) ..."):
            mm = export_mmproj(model, args.mmproj, mm_type)
        console.print(f"wrote {mm} ({mm.stat().st_size / 2**20:,.1f} MiB): the vision tower and "
                      f"{projector_type(model.config)} projector; llama-mtmd-cli -m {path} --mmproj {mm}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
