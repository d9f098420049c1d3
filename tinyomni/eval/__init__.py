"""Evaluation: task files, metrics from their published definitions, a batched resumable runner for
tinyomni models and OpenAI-compatible endpoints, baselines, converters and reports.

    from tinyomni import eval as te
    items = te.load_task("world-bench/world-bench.jsonl")
    summary = te.evaluate(model, te.prepare_items(items, te.RunConfig()), "runs/mine", model_name="mine")
"""

from tinyomni.eval.baselines import OracleModel, RandomGuessModel
from tinyomni.eval.endpoint import EndpointError, EndpointModel
from tinyomni.eval.formats import FORMATS, convert
from tinyomni.eval.metrics import METRICS, summarize
from tinyomni.eval.report import compare_chart, compare_markdown, load_summaries, summary_markdown
from tinyomni.eval.runner import ChatModel, RunConfig, evaluate, prepare_items, summarize_rows
from tinyomni.eval.tasks import Item, circular_variants, item_messages, load_task, prompt_text

__all__ = [
    "FORMATS", "METRICS", "ChatModel", "EndpointError", "EndpointModel", "Item", "OracleModel",
    "RandomGuessModel", "RunConfig", "circular_variants", "compare_chart", "compare_markdown", "convert",
    "evaluate", "item_messages", "load_summaries", "load_task", "prepare_items", "prompt_text", "summarize",
    "summarize_rows", "summary_markdown",
]
