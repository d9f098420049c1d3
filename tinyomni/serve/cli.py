"""`tinyomni serve`: the OpenAI-compatible server and web chat page for one model.

    tinyomni serve --model smollm2                      # http://127.0.0.1:8000/ (page), /v1 (API)
    tinyomni serve --model ckpt/ --api-key secret --allow-dir ~/pictures --max-media-items 4

`register(subparsers)` adds the sub-command to the main CLI; `python -m tinyomni.serve.cli` also works.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tinyomni.serve.server import ServerOptions

_DEFAULTS = ServerOptions()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to a CLI's sub-commands; its `func(args)` returns the exit code."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible server and web chat page",
                              description="Serve one model over an OpenAI-compatible HTTP API (/v1/chat/"
                                          "completions, /v1/models, /health) with a chat page at /.")
    p.add_argument("--model", default=None, help="'tinyomni-world' (default), a checkpoint directory, "
                   "'smollm2', a .gguf file, a HF directory or a hub id")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients pass (default: from --model)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
        help="weight-only int8/int4 decoder (the engine's CPU kernels)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights, activations and KV cache (default: %(default)s)")
    p.add_argument("--encoder-dtype", default=None, choices=["float32", "bfloat16"],
                   help="the vision/audio towers' dtype, if not --dtype (bfloat16: faster images on AMX CPUs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TINYOMNI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TINYOMNI_API_KEY, else none)")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="a host image URLs may be fetched from (repeatable; '*.example.org' for subdomains; "
                        "without :PORT only the scheme's own port, 80 or 443)")
    p.add_argument("--fetch-timeout", type=float, default=_DEFAULTS.fetch_timeout,
                   help="seconds one image URL may take to fetch, redirects included (default: %(default)g)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR", type=Path,
                   help="a directory whose files image_url may name by path (repeatable)")
    limits = p.add_argument_group("limits (each violation answers a 4xx naming the limit)")
    limits.add_argument("--max-body-mb", type=float, default=_DEFAULTS.max_body_bytes / 2**20,
                        help="largest request body, and largest fetched image (default: %(default)g)")
    limits.add_argument("--max-image-pixels", type=int, default=_DEFAULTS.max_image_pixels,
                        help="largest image, width × height (default: %(default)d)")
    limits.add_argument("--max-tiles", type=int, default=None,
                        help="tiles per image (default: the model's own maximum)")
    limits.add_argument("--max-media-items", type=int, default=_DEFAULTS.max_media_items,
                        help="images + audio clips per request (default: %(default)d)")
    limits.add_argument("--max-audio-seconds", type=float, default=_DEFAULTS.max_audio_seconds,
                        help="longest audio clip (default: %(default)g)")
    limits.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens,
                        help="largest max_tokens a request may ask for, and the default "
                             "(default: %(default)d)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-batch", type=int, default=_DEFAULTS.max_batch,
                        help="requests decoded together (default: %(default)d)")
    engine.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue,
                        help="requests waiting for a slot before the server answers 503 "
                             "(default: %(default)d)")
    engine.add_argument("--max-context", type=int, default=_DEFAULTS.max_context,
                        help="KV-cache tokens per request, prompt + answer (default: %(default)d, capped "
                             "at the model's context)")
    engine.add_argument("--temperature", type=float, default=None,
                        help="temperature for requests that give none (default: the model's "
                             "generation_config.json, else 1.0 as OpenAI)")
    engine.add_argument("--top-p", type=float, default=None,
                        help="top_p for requests that give none (default: the model's, else 1.0)")
    engine.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=handler)
    return p


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        model_name=args.served_model_name, api_key=args.api_key or None, allow_hosts=list(args.allow_host),
        allow_dirs=list(args.allow_dir), max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_tiles=args.max_tiles,
        max_media_items=args.max_media_items, max_audio_seconds=args.max_audio_seconds,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
        fetch_timeout=args.fetch_timeout)


def handler(args: argparse.Namespace) -> int:
    import uvicorn

    from tinyomni.api import load
    from tinyomni.errors import TinyOmniError
    from tinyomni.serve.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for d in args.allow_dir:
        if not d.expanduser().is_dir():
            print(f"error: --allow-dir {d} is not a directory", file=sys.stderr)
            return 2
    try:
        model = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                     encoder_dtype=args.encoder_dtype)
    except TinyOmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = options_from_args(args)
    try:
        app = create_app(model, options)
    except ValueError as e:  # e.g. --max-batch 0
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        print(f"warning: listening on {args.host} with no --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    engine = app.state.engine
    print(f"tinyomni: serving {model.name} at http://{args.host}:{args.port}/ (API at /v1); "
          f"{engine.max_batch} requests at a time, {engine.max_context} tokens each "
          f"(KV cache {engine.cache_bytes / 2**20:,.0f} MiB; --max-batch, --max-context)", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    # If the engine loop ever dies, stop serving and exit non-zero so a supervisor restarts us,
    # rather than answer every request with an error (/health says 503 meanwhile).
    engine.on_failure = lambda _: setattr(server, "should_exit", True)
    try:
        server.run()
    except OSError as e:  # e.g. the port is taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    if engine.failure is not None:
        print(f"error: the engine stopped after an internal error ({type(engine.failure).__name__}: "
              f"{engine.failure}); the traceback is in the log above", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyomni")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
