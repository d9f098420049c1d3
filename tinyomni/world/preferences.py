"""Preference data from a model's own mistakes on the synthetic world, for a `dpo` training stage.

    tinyomni world preferences --model tinyomni-world --out prefs/prefs.jsonl --split train --n 100

Each world question is asked the way the eval harness asks it (`item_messages`, greedy, batched) and
scored with its own metric; for every answer that is not fully right, one record

    {"id": ..., "task": skill, "prompt": [chat messages, media paths relative to the file],
     "chosen": the exact answer, "rejected": what the model said, "score": its score}

is written, and the question's media under `media/<skill>/` beside the JSONL. Questions the model
gets right, or answers with nothing, give no pair (there is nothing to prefer against).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tinyomni.eval.runner import score_row
from tinyomni.eval.tasks import item_from_record, item_messages
from tinyomni.world.generator import DifficultySpec, generate, to_record
from tinyomni.world.writers import write_sample


class BatchChatModel(Protocol):
    def chat_batch(self, batch: list[list[dict[str, Any]]], max_new_tokens: int = ...) -> list[str]: ...


def make_preferences(model: BatchChatModel, out: str | Path, skills: Sequence[str] | str = "all",
                     split: str = "train", n: int = 50, seed: int = 0, difficulty: DifficultySpec = None,
                     batch_size: int = 8, max_new_tokens: int = 32, progress: bool = False) -> dict[str, Any]:
    """Ask `model` `n` questions per skill and write a preference record for each wrong answer to the
    JSONL `out`. Returns counts per skill: asked, wrong (a pair written), right, and empty (no answer:
    no pair either)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = list(generate(skills, n=n, split=split, seed=seed, difficulty=difficulty))
    asked, wrong, empty = Counter(), Counter(), Counter()
    from rich.progress import Progress

    with Progress(disable=not progress) as bar, out.open("w", encoding="utf-8") as f:
        task = bar.add_task("asking", total=len(samples))
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            items = [item_from_record(to_record(s), where=s.id, default_id=s.id, default_task=s.skill) for s in batch]
            predictions = model.chat_batch([item_messages(item) for item in items], max_new_tokens=max_new_tokens)
            for sample, item, prediction in zip(batch, items, predictions):
                asked[sample.skill] += 1
                prediction = str(prediction).strip()
                score = score_row(item, prediction)["score"]
                if not prediction:
                    empty[sample.skill] += 1
                    continue
                if score >= 1.0:
                    continue
                wrong[sample.skill] += 1
                # Media files only for the questions kept; paths stay relative, so the folder can move.
                record = write_sample(sample, out.parent)
                prompt = item_messages(item_from_record(record, root=None, where=sample.id))
                row = {"id": sample.id, "task": sample.skill, "prompt": prompt, "chosen": sample.answer,
                       "rejected": prediction, "score": score}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.advance(task, len(batch))
    return {skill: {"asked": asked[skill], "wrong": wrong[skill], "empty": empty[skill],
                    "right": asked[skill] - wrong[skill] - empty[skill]} for skill in asked}
