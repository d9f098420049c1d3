"""Text replay: a base model's own answers to general prompts, mixed into instruction tuning.

Tuning the decoder (LoRA) on thousands of one-word answers about pictures wears away what the base
model knew: it starts to answer "What is the capital of Japan?" with a word that merely looks like an
answer. Mixing in its own answers to ordinary prompts (self-distillation, as LLaVA-style recipes mix in
text-only chat) keeps text-only behaviour where it was, at no cost in labels.

    python -m tinyomni.train.replay --model smollm2 --prompts recipes/data/replay_prompts.txt \\
        --out recipes/data/smollm2_replay.jsonl

Then in a recipe's chat stage: `data = { ..., replay = "data/smollm2_replay.jsonl", replay_fraction = 0.2 }`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tinyomni.errors import InputError


def make_replay(model: Any, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
                progress: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Greedy answers of `model` (a `tinyomni.Model`) to `prompts`, as chat records; and how many were
    left out because the answer did not end within `max_new_tokens` (a cut answer would teach the
    model to stop mid-sentence)."""
    from rich.progress import Progress

    records, cut = [], 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("replay answers", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start: start + batch_size]
            completions = model.complete_batch([[{"role": "user", "content": p}] for p in batch],
                                               max_new_tokens=max_new_tokens)
            for i, (prompt, completion) in enumerate(zip(batch, completions)):
                if completion.finish_reason != "stop":
                    cut += 1
                    continue
                records.append({"id": f"replay-{start + i:04d}", "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion.text.strip()}]})
            bar.advance(task, len(batch))
    return records, cut


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{path} has no prompts (one per line)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    from tinyomni import load
    from tinyomni.errors import TinyOmniError

    p = argparse.ArgumentParser(prog="python -m tinyomni.train.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="the base model whose answers to keep (default smollm2)")
    p.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    p.add_argument("--out", required=True, help="the JSONL of chat records to write")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    try:
        prompts = read_prompts(args.prompts)
        records, cut = make_replay(load(args.model), prompts, args.max_new_tokens, args.batch_size)
    except TinyOmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, out)
    print(f"{len(records)} records written to {out}; {cut} answers longer than {args.max_new_tokens} tokens left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
