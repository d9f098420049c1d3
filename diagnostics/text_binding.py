"""Can a decoder bind colours to shapes when the scene is written out in words, with no picture at all?

    python diagnostics/text_binding.py smollm2 tinyomni-world --n 100

"The image shows a red star, a blue circle and a green square. What color is the circle?" asks the
same as world-bench's colour skill, with the vision side taken out of the way: a decoder that fails
here cannot answer the picture version either, however well the encoder sees. Scenes are drawn like
the world skills draw them (2-5 objects; unique shapes for colour questions, unique colours for shape
questions). The answer's first colour (or shape) word counts, so a sentence answer is not penalised.
"Guess among named" is the score of picking one of the scene's colours (shapes) at random: a model
that knows what is there but not what goes with what scores about that.

`--write-training FILE` writes instead what v8c (run 8 of docs/training.md) trained on: the SmolLM2 replay
records plus as many written-out scenes (train-split colour-shape pairs, other wording: "In a picture
there are ...") with four questions each in the world skills' words, for a chat stage's `replay`:

    python diagnostics/text_binding.py --write-training runs/replay_binding.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import tinyomni
from tinyomni.errors import TinyOmniError
from tinyomni.world.render import COLORS, SHAPES

COLOR_Q = "The image shows {scene}. What color is the {shape}? Answer with a single word."
SHAPE_Q = "The image shows {scene}. What shape is the {color} object? Answer with a single word."


def written(objects: list[tuple[str, str]]) -> str:
    """(colour, shape) pairs as words: "a red star, a blue circle and a green square"."""
    words = [f"a {c} {s}" for c, s in objects]
    return ", ".join(words[:-1]) + f" and {words[-1]}"


def scenes(n: int, seed: int, asked: str) -> list[tuple[str, str, float]]:
    """(question, answer, chance of guessing among the scene's values) for `asked` = color or shape."""
    rng = random.Random(f"{seed}/{asked}")
    out = []
    for _ in range(n):
        k = rng.randint(2, 5)
        if asked == "color":  # unique shapes: "the star" names one object
            shapes = rng.sample(list(SHAPES), k)
            colors = [rng.choice(list(COLORS)) for _ in shapes]
        else:  # unique colours: "the red object" names one object
            colors = rng.sample(list(COLORS), k)
            shapes = [rng.choice(list(SHAPES)) for _ in colors]
        scene = written(list(zip(colors, shapes)))
        t = rng.randrange(k)
        if asked == "color":
            out.append((COLOR_Q.format(scene=scene, shape=shapes[t]), colors[t], 1 / len(set(colors))))
        else:
            out.append((SHAPE_Q.format(scene=scene, color=colors[t]), shapes[t], 1 / len(set(shapes))))
    return out


def first_word_of(answer: str, vocabulary: tuple[str, ...] | list[str]) -> str | None:
    words = [w.strip(".,!:;\"'").lower() for w in answer.split()]
    return next((w for w in words if w in vocabulary), None)


def training_records(replay: Path, n: int, seed: str = "text-binding-train") -> list[dict]:
    """The records of `replay` followed by `n` written-out scenes, each with four questions."""
    from tinyomni.world.skills import scene_questions
    from tinyomni.world.splits import pairs

    rng = random.Random(seed)
    allowed = pairs("train")
    records = [json.loads(line) for line in replay.read_text().splitlines() if line.strip()]
    for i in range(n):
        objects = [dict(zip(("color", "shape"), rng.choice(allowed))) for _ in range(rng.randint(2, 6))]
        scene = written([(o["color"], o["shape"]) for o in objects])
        messages = []
        for j, (question, answer) in enumerate(scene_questions(objects, rng, "train", 4)):
            intro = f"In a picture there are {scene}. " if j == 0 else ""
            messages += [{"role": "user", "content": intro + question}, {"role": "assistant", "content": answer}]
        records.append({"id": f"bind-{i:04d}", "messages": messages})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="models to ask (smollm2, tinyomni-world, a directory)")
    parser.add_argument("--n", type=int, default=100, help="questions per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-training", type=Path, metavar="FILE", help="write training records instead")
    parser.add_argument("--replay", type=Path, default=Path(__file__).parents[1] / "recipes/data/smollm2_replay.jsonl",
                        help="replay records to start the training file with")
    parser.add_argument("--scenes", type=int, default=220, help="written-out scenes in the training file")
    args = parser.parse_args()
    if args.write_training:
        if not args.replay.is_file():
            sys.exit(f"error: replay records not found: {args.replay}")
        records = training_records(args.replay, args.scenes)
        tmp = args.write_training.with_name(args.write_training.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, args.write_training)
        print(f"{len(records)} records written to {args.write_training}")
        return
    if not args.models:
        parser.error("name at least one model (or --write-training FILE)")
    questions = {asked: scenes(args.n, args.seed, asked) for asked in ("color", "shape")}
    table = Table(title=f"binding in text: {args.n} questions per kind (accuracy %)")
    for column in ("model", "colour", "shape"):
        table.add_column(column, justify="right")
    table.add_row("guess among named", *(f"{100 * sum(c for _, _, c in questions[a]) / args.n:.1f}"
                                         for a in ("color", "shape")))
    console = Console()
    for name in args.models:
        try:
            model = tinyomni.load(name)
        except TinyOmniError as e:
            sys.exit(f"error: {e}")
        scores = []
        for asked, vocabulary in (("color", COLORS), ("shape", SHAPES)):
            with console.status(f"{name}: {asked} questions"):
                answers = model.chat_batch([[{"role": "user", "content": q}] for q, _, _ in questions[asked]],
                                           max_new_tokens=12)
            right = sum(first_word_of(a, list(vocabulary)) == truth
                        for a, (_, truth, _) in zip(answers, questions[asked]))
            scores.append(f"{100 * right / args.n:.1f}")
        table.add_row(name, *scores)
    console.print(table)


if __name__ == "__main__":
    main()
