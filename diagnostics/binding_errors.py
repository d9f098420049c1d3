"""Which kind of wrong are a model's colour and shape answers: not seeing, or not binding?

    tinyomni eval run world-bench --model tinyomni-world --out runs/eval/world-bench
    python diagnostics/binding_errors.py runs/eval/world-bench/predictions.jsonl \\
        ~/.cache/tinyomni/world-bench-v1/world-bench.jsonl

For "What color is the star?" a wrong answer is either a colour that is somewhere in the picture (the
model sees the colours but does not tie them to the right object) or one that is not (it does not see
them). "Guess among present" is the score of answering a random colour (shape) of the picture: a model
that sees every object but binds none scores about that.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tinyomni.world.writers import read_records

ASKED = ("color", "shape")  # each task's answer names that attribute of an object


def read(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        sys.exit(f"error: {what} not found: {path}")
    try:
        return read_records(path)
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path} is not JSONL ({e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", type=Path, help="predictions.jsonl of `tinyomni eval run`")
    parser.add_argument("records", type=Path, help="the task JSONL it ran on (world records, with meta.objects)")
    args = parser.parse_args()
    records = {r["id"]: r for r in read(args.records, "records")}
    predictions = read(args.predictions, "predictions")
    table = Table(title=f"colour and shape answers of {args.predictions}")
    for column in ("task", "n", "right %", "wrong, present %", "wrong, absent %", "guess among present %"):
        table.add_column(column, justify="right")
    for task in ASKED:
        counts: Counter[str] = Counter()
        chance = 0.0
        for p in predictions:
            record = records.get(p["id"])
            if p["task"] != task or record is None:
                continue
            objects = (record.get("meta") or {}).get("objects")
            if not objects:
                sys.exit(f"error: record {p['id']} in {args.records} has no meta.objects (a world record is needed)")
            present = {o[task] for o in objects}
            chance += 1 / len(present)
            counts["right" if p["score"] > 0 else "present" if p["prediction"].strip().lower() in present
                   else "absent"] += 1
        n = sum(counts.values())
        if n:
            table.add_row(task, str(n), *(f"{100 * counts[k] / n:.0f}" for k in ("right", "present", "absent")),
                          f"{100 * chance / n:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
