"""The evaluation loop: items -> chat messages -> model (batched) -> predictions -> scores.

Anything with `chat` and `chat_batch` is a model here: a tinyomni Model, an OpenAI-compatible
endpoint (endpoint.py), or a baseline (baselines.py). Predictions are appended to
<out>/predictions.jsonl after every batch, so an interrupted run resumes where it stopped; at the end
<out>/summary.json and <out>/summary.md hold the scores.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tinyomni.errors import InputError, TinyOmniError
from tinyomni.eval.metrics import METRICS, summarize
from tinyomni.eval.report import summary_markdown
from tinyomni.eval.tasks import Item, circular_variants, item_messages


class ChatModel(Protocol):
    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = ...) -> str: ...

    def chat_batch(self, batch: list[list[dict[str, Any]]], max_new_tokens: int = ...) -> list[str]: ...


@dataclass
class RunConfig:
    batch_size: int = 8
    max_new_tokens: int = 32  # answers here are short; long rambles are cut, not waited for
    limit: int | None = None  # at most this many items per task (in file order)
    circular: bool = False  # MMBench circular evaluation of multiple-choice items
    resume: bool = True  # keep predictions already in <out>/predictions.jsonl
    progress: bool = True


def prepare_items(items: Sequence[Item], config: RunConfig) -> list[Item]:
    """Apply the per-task limit, then expand multiple-choice items into rotations if circular."""
    taken: dict[str, int] = defaultdict(int)
    out: list[Item] = []
    for item in items:
        if config.limit is not None and taken[item.task] >= config.limit:
            continue
        taken[item.task] += 1
        out.extend(circular_variants(item) if config.circular and item.choices else [item])
    return out


def evaluate(model: ChatModel, items: Sequence[Item], out: str | Path, model_name: str = "model",
             config: RunConfig | None = None) -> dict[str, Any]:
    """Run `model` on `items` (already prepared) and write predictions and summaries into `out`."""
    config = config or RunConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.jsonl"
    ids = {item.id for item in items}
    if len(ids) != len(items):
        raise InputError("item ids must be unique across the tasks of a run (predictions are keyed by id)")
    done = _load_done(path, ids) if config.resume else {}
    _rewrite(path, done.values())
    todo = [item for item in items if item.id not in done]
    started = time.perf_counter()
    columns = (TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, disable=not config.progress) as bar, path.open("a", encoding="utf-8") as f:
        task = bar.add_task(model_name, total=len(items), completed=len(done))
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            predictions, errors = _predict(model, batch, config.max_new_tokens)
            for item, prediction, error in zip(batch, predictions, errors):
                row = score_row(item, prediction, error)
                done[item.id] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a crash loses at most the batch in flight
            bar.advance(task, len(batch))
    seconds = time.perf_counter() - started
    # Re-score from the saved predictions, so resumed rows follow the current metric code too.
    rows = [score_row(item, done[item.id]["prediction"], done[item.id].get("error")) for item in items]
    summary = summarize_rows(rows)
    summary.update({"model": model_name, "n": len(rows), "new_predictions": len(todo),
                    "seconds": round(seconds, 2),
                    "items_per_second": round(len(todo) / seconds, 3) if todo else None,
                    "config": asdict(config)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def _predict(model: ChatModel, batch: list[Item], max_new_tokens: int) -> tuple[list[str], list[str | None]]:
    """Ask for a whole batch; if the model rejects it (one bad or too-long item), ask one by one so
    the others still get answers and the bad one is recorded with its error."""
    messages = [item_messages(item) for item in batch]
    try:
        answers = model.chat_batch(messages, max_new_tokens=max_new_tokens)
        return [str(a) for a in answers], [None] * len(batch)
    except TinyOmniError:
        pass
    predictions: list[str] = []
    errors: list[str | None] = []
    for m in messages:
        try:
            predictions.append(str(model.chat(m, max_new_tokens=max_new_tokens)))
            errors.append(None)
        except TinyOmniError as e:
            predictions.append("")
            errors.append(f"{type(e).__name__}: {e}")
    return predictions, errors


def score_row(item: Item, prediction: str, error: str | None = None) -> dict[str, Any]:
    """One line of predictions.jsonl: the prediction, its per-item score and what summaries need."""
    row: dict[str, Any] = {
        "id": item.id, "task": item.task, "metric": item.metric, "prediction": prediction,
        "answers": item.answers, "score": METRICS[item.metric](prediction, item.answers, item.choices),
        "n_options": len(item.choices) if item.choices else len(item.candidates) if item.candidates else 0,
    }
    for key in ("category", "group", "circular_of"):
        if getattr(item, key) is not None:
            row[key] = getattr(item, key)
    if error:
        row["error"] = error
    return row


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Group rows by task (and metric, when a task mixes metrics) and score each group; `average` is
    the mean of the groups' 0-100 scores."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["metric"])].append(row)
    mixed = {task for task, _ in groups if sum(1 for t, _ in groups if t == task) > 1}
    tasks = {}
    for (task, metric), group in groups.items():
        tasks[f"{task}/{metric}" if task in mixed else task] = summarize(metric, group)
    average = sum(t["score"] for t in tasks.values()) / len(tasks) if tasks else 0.0
    return {"tasks": tasks, "average": average, "errors": sum(1 for r in rows if r.get("error"))}


def _load_done(path: Path, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Predictions already made for these items; a line cut off by a crash is dropped."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("id") in ids:
            done[row["id"]] = row
    return done


def _rewrite(path: Path, rows: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
