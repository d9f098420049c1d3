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


# --- retrieval (dual encoders) ---------------------------------------------------------------------
RECALL_AT = (1, 5, 10)


def retrieval_ranks(similarity: Any, positives: Any) -> list[int]:
    """For each query row of `similarity` [Q, C], the 1-based rank of its best-scored positive
    candidate (`positives` [Q, C] bool): 1 + the candidates scored strictly higher. Ties with a
    negative count in the query's favour, as with argsort-based ranking on distinct scores."""
    best = similarity.masked_fill(~positives, float("-inf")).amax(1, keepdim=True)
    return [int(r) + 1 for r in ((similarity > best) & ~positives).sum(1).tolist()]


def retrieval_scores(ranks: Sequence[int], candidates: int) -> dict[str, Any]:
    """recall@k (percent of queries whose positive ranks within the top k), mean and median rank."""
    n = len(ranks)
    ordered = sorted(ranks)
    out: dict[str, Any] = {f"recall@{k}": 100 * sum(r <= k for r in ranks) / n for k in RECALL_AT}
    out.update({"mean_rank": sum(ranks) / n, "median_rank": float(ordered[n // 2] if n % 2 else
                                                                  (ordered[n // 2 - 1] + ordered[n // 2]) / 2),
                "candidates": candidates})
    return out


def evaluate_retrieval(encoder: Any, pairs: Sequence[Any], out: str | Path, model_name: str = "model",
                       task: str = "world-retrieval", space: str = "image") -> dict[str, Any]:
    """Image → text and text → image retrieval of `pairs` (tasks.RetrievalPair) with a dual encoder
    (`tinyomni.retrieval`): every image against every caption. Captions that repeat are all positives
    of each other's images. Writes <out>/summary.json and summary.md; `score` is recall@1."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(pairs) < 2:
        raise InputError("retrieval needs at least 2 pairs")
    started = time.perf_counter()
    images = encoder.embed(image=[p.image for p in pairs])
    texts = encoder.embed(text=[p.text for p in pairs], space=space)
    similarity = images @ texts.T  # cosine: the model's logits rank the same (a positive scale, a shared bias)
    names = [p.text for p in pairs]
    positives = torch.tensor([[a == b for b in names] for a in names])
    tasks: dict[str, Any] = {}
    for direction, sim, pos in (("image_to_text", similarity, positives), ("text_to_image", similarity.T, positives.T)):
        scores = retrieval_scores(retrieval_ranks(sim, pos), len(pairs))
        chance = 100 * float((pos.sum(1).float() / len(pairs)).mean())
        tasks[f"{task}/{direction}"] = {"metric": "recall@1", "n": len(pairs), "score": scores["recall@1"],
                                        "chance": chance, **scores}
    summary: dict[str, Any] = {
        "tasks": tasks, "average": sum(t["score"] for t in tasks.values()) / len(tasks), "errors": 0,
        "model": model_name, "n": len(pairs), "seconds": round(time.perf_counter() - started, 2),
        "distinct_captions": len(set(names))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(retrieval_markdown(summary))
    return summary


def retrieval_markdown(summary: dict[str, Any]) -> str:
    lines = [f"## {summary.get('model', 'model')}", "",
             "| task | n | R@1 | R@5 | R@10 | mean rank | median rank | chance R@1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in summary["tasks"].items():
        lines.append(f"| {name} | {t['n']} | {t['recall@1']:.1f} | {t['recall@5']:.1f} | {t['recall@10']:.1f} | "
                     f"{t['mean_rank']:.1f} | {t['median_rank']:.1f} | {t['chance']:.1f} |")
    return "\n".join(lines) + "\n"


def run_world_retrieval(model: str, out: str | Path, n: int | None = None, device: str = "cpu",
                        space: str = "image") -> dict[str, Any]:
    """`tinyomni eval run world-retrieval --model M`: the task's fixed pairs (tasks.world_retrieval_pairs),
    `n` of them (default all), scored with `tinyomni.retrieval.load(model)`."""
    from tinyomni import retrieval
    from tinyomni.eval.tasks import RETRIEVAL_N, WORLD_RETRIEVAL, world_retrieval_pairs

    encoder = retrieval.load(model, device=device)
    pairs = world_retrieval_pairs(n or RETRIEVAL_N)
    return evaluate_retrieval(encoder, pairs, out, model_name=Path(model).name or model, task=WORLD_RETRIEVAL,
                              space=space)
