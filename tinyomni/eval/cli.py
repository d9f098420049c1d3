"""`tinyomni eval ...`: run tasks on a model or endpoint, convert benchmark files, compare runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from tinyomni.errors import InputError
from tinyomni.eval.baselines import OracleModel, RandomGuessModel
from tinyomni.eval.endpoint import EndpointModel
from tinyomni.eval.formats import FORMATS, convert
from tinyomni.eval.report import compare_chart, compare_markdown, load_summaries, summary_markdown
from tinyomni.eval.runner import RunConfig, evaluate, prepare_items
from tinyomni.eval.tasks import Item, load_task

BASELINES = {"random": RandomGuessModel, "oracle": OracleModel}


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a model or endpoint on task files (or world-bench)")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    run = sub.add_parser("run", help="score a model on one or more tasks")
    run.add_argument("tasks", nargs="+", help="task JSONL files, 'world-bench' (generated on first use), or "
                                                 "'world-retrieval' (a dual encoder's recall@k, alone)")
    who = run.add_argument_group("what to evaluate (one of)")
    who.add_argument("--model", help="a tinyomni model (name or checkpoint folder), or with --endpoint the "
                                     "model name the endpoint serves")
    who.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    who.add_argument("--baseline", choices=sorted(BASELINES), help="random guess (chance) or oracle (100 %%)")
    run.add_argument("--device", default="cpu", help="for a tinyomni model: cpu or cuda")
    run.add_argument("--quantize", choices=["int8", "int4"], default=None,
        help="weight-only int8/int4 decoder (the engine's CPU kernels)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="for a tinyomni model")
    run.add_argument("--encoder-dtype", default=None, choices=["float32", "bfloat16"],
                     help="for a tinyomni model: the vision/audio towers' dtype, if not --dtype")
    run.add_argument("--out", "-o", help="output folder (default runs/eval/<model>)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--limit", type=int, help="at most this many items per task")
    run.add_argument("--circular", action="store_true", help="circular evaluation of multiple-choice items")
    run.add_argument("--no-resume", action="store_true",
                     help="start over instead of keeping earlier predictions")
    run.add_argument("--api-key", help="endpoint key (default $TINYOMNI_API_KEY or $OPENAI_API_KEY)")
    run.add_argument("--concurrency", type=int, default=4, help="parallel endpoint requests")
    run.add_argument("--bench-dir",
                     help="where world-bench is generated (default ~/.cache/tinyomni/world-bench-v1)")
    run.set_defaults(func=_run)

    conv = sub.add_parser("convert", help="turn a benchmark's published files into a task JSONL")
    conv.add_argument("format", choices=sorted(FORMATS))
    conv.add_argument("source", help="the benchmark's file or folder")
    conv.add_argument("--out", "-o", required=True, help="task JSONL to write")
    conv.add_argument("--images", help="folder with the benchmark's images")
    conv.set_defaults(func=_convert)

    cmp_ = sub.add_parser("compare", help="side-by-side table and bar chart of several runs")
    cmp_.add_argument("runs", nargs="+", help="run folders (or their summary.json)")
    cmp_.add_argument("--out", "-o", default="compare.png", help="bar chart PNG")
    cmp_.add_argument("--md", help="also write the markdown table here")
    cmp_.add_argument("--names", help="comma-separated names for the runs (default: their model names)")
    cmp_.set_defaults(func=_compare)


def load_tasks(tasks: list[str], bench_dir: str | None = None) -> list[Item]:
    items: list[Item] = []
    for task in tasks:
        if task == "world-bench":
            from tinyomni.world.bench import ensure_bench

            items += load_task(ensure_bench(bench_dir, progress=True))
        else:
            items += load_task(task)
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise InputError("two task files share item ids; give each file distinct ids")
    return items


def _run(args: argparse.Namespace) -> int:
    if "world-retrieval" in args.tasks:
        return _run_retrieval(args)
    local = args.model is not None and not args.endpoint
    chosen = (args.endpoint is not None) + (args.baseline is not None) + local
    if chosen != 1:
        raise InputError("choose exactly one of --model NAME, --endpoint URL --model NAME, "
                         "--baseline random|oracle")
    config = RunConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                       circular=args.circular, resume=not args.no_resume)
    items = prepare_items(load_tasks(args.tasks, args.bench_dir), config)
    if args.baseline:
        model, name = BASELINES[args.baseline](items), args.baseline
    elif args.endpoint:
        if not args.model:
            raise InputError("--endpoint needs --model NAME (the model name the server expects)")
        model = EndpointModel(args.endpoint, args.model, api_key=args.api_key, concurrency=args.concurrency)
        name = args.model
    else:
        import tinyomni

        model = tinyomni.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                              encoder_dtype=args.encoder_dtype)
        name = Path(args.model).name or args.model
    out = args.out or str(Path("runs") / "eval" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    summary = evaluate(model, items, out, model_name=name, config=config)
    console = Console()
    console.print(Markdown(summary_markdown(summary)))
    console.print(f"predictions and summary in {out}")
    return 0


def _run_retrieval(args: argparse.Namespace) -> int:
    """world-retrieval scores a dual encoder's embeddings (recall@k, mean rank), not generated answers."""
    from tinyomni.eval.runner import retrieval_markdown, run_world_retrieval

    if args.tasks != ["world-retrieval"] or not args.model or args.endpoint or args.baseline:
        raise InputError("world-retrieval runs alone, on a local dual encoder: "
                         "tinyomni eval run world-retrieval --model M")
    name = Path(args.model).name or args.model
    out = args.out or str(Path("runs") / "eval" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + "-retrieval"))
    Console().print(Markdown(retrieval_markdown(run_world_retrieval(args.model, out, n=args.limit,
                                                                    device=args.device))))
    Console().print(f"scores in {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    path = convert(args.format, args.source, args.out, images=args.images)
    n = sum(1 for _ in path.open())
    Console().print(f"wrote {n} items to {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    summaries = load_summaries(args.runs)
    names = args.names.split(",") if args.names else None
    table = compare_markdown(summaries, names)
    Console().print(Markdown(table))
    if args.md:
        Path(args.md).write_text(table)
    path = compare_chart(summaries, args.out, names)
    Console().print(f"bar chart in {path}")
    return 0
