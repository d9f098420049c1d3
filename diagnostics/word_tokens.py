"""Would the decoder bind colours to shapes if the picture's objects reached it as words?

    tinyomni world generate --out runs/val --split val --n 50 --skills color,shape
    python diagnostics/word_tokens.py runs/val/val.jsonl tinyomni-world runs/v8c/model

The colour and shape questions of a world JSONL are asked three times with the same picture, changing
only the image tokens the decoder receives:

- `picture`: unchanged, what the model normally sees;
- `centre`: the token at each object's centre (the 5x5 grid cell holding it) is replaced by the sum of
  its colour's and its shape's word embeddings, so the object literally reads "red + star";
- `words`: the first image tokens are replaced by the object's words in sequence ("red", "star",
  "blue", "circle", ...), the written-out scene of diagnostics/text_binding.py without its glue words.

If `centre` or `words` scored far above `picture`, the decoder could bind and the projector would be
the thing to fix (e.g. align it to the word embeddings). If they do not, the decoder has to learn to
bind on image tokens themselves. The answer's first colour (shape) word counts, as in text_binding.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import tinyomni
from tinyomni.errors import TinyOmniError
from tinyomni.world.render import COLORS, SHAPES

sys.path.insert(0, str(Path(__file__).parent))  # the sibling diagnostics' helpers, so all three agree
from binding_errors import read  # noqa: E402
from probe_vision import centre_cell  # noqa: E402
from text_binding import first_word_of  # noqa: E402

MODES = ("picture", "centre", "words")
VOCABULARY = {"color": list(COLORS), "shape": list(SHAPES)}


def replace_tokens(tokens: torch.Tensor, objects: list[dict], mode: str,
                   word: dict[str, torch.Tensor]) -> torch.Tensor:
    """One image's tokens [1, side², width] with its objects written in as `mode` says."""
    if mode == "picture":
        return tokens
    tokens = tokens.clone()
    side = int(tokens.shape[1] ** 0.5)
    if mode == "centre":
        for obj in objects:
            tokens[0, centre_cell(obj, side)] = word[obj["color"]] + word[obj["shape"]]
    else:
        sequence = [word[obj[key]] for obj in objects for key in ("color", "shape")][: tokens.shape[1]]
        tokens[0, : len(sequence)] = torch.stack(sequence)
    return tokens


def word_vectors(model: tinyomni.Model) -> dict[str, torch.Tensor]:
    """Each colour and shape word as the decoder's own input embedding (a multi-token word: their mean)."""
    return {w: model.model.language_model.embed(torch.tensor(model.tokenizer.encode(" " + w))).mean(0)
            for w in VOCABULARY["color"] + VOCABULARY["shape"]}


def score(model: tinyomni.Model, records: list[dict], root: Path, mode: str, word: dict[str, torch.Tensor],
          console: Console) -> dict[str, float]:
    omni = model.model
    encode = omni.encode_images
    current: list[dict] = []

    def encode_with_words(pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] != 1:
            raise SystemExit("error: word_tokens needs one tile per image (a model without dynamic tiling)")
        return replace_tokens(encode(pixel_values), current, mode, word)

    omni.encode_images = encode_with_words  # this script's only change to the model: what the image tokens are
    right = {asked: [0, 0] for asked in VOCABULARY}
    try:
        with console.status(f"{model.name}: {mode}"):
            for record in records:
                current[:] = record["meta"]["objects"]
                answer = model.ask(record["question"], image=Image.open(root / record["image"]), max_new_tokens=8)
                tally = right[record["task"]]
                tally[0] += first_word_of(answer, VOCABULARY[record["task"]]) == record["answers"][0]
                tally[1] += 1
    finally:
        del omni.encode_images
    return {asked: 100 * r / n if n else float("nan") for asked, (r, n) in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, help="a world JSONL with colour and shape questions")
    parser.add_argument("models", nargs="+", help="models to ask (tinyomni-world, a directory)")
    args = parser.parse_args()
    records = [r for r in read(args.records, "records") if r.get("task") in VOCABULARY]
    if not records:
        sys.exit(f"error: {args.records} has no color or shape questions "
                 "(tinyomni world generate --skills color,shape)")
    if any(not (r.get("meta") or {}).get("objects") or r.get("image") is None for r in records):
        sys.exit(f"error: {args.records} has records without an image or meta.objects (a world JSONL is needed)")
    torch.manual_seed(0)
    console = Console()
    table = Table(title=f"{len(records)} colour and shape questions of {args.records}, image tokens replaced "
                        "by words (accuracy %)")
    for column in ("model", "image tokens", "colour", "shape"):
        table.add_column(column, justify="right")
    for name in args.models:
        try:
            model = tinyomni.load(name)
        except TinyOmniError as e:
            sys.exit(f"error: {e}")
        if model.model.vision_tower is None:
            sys.exit(f"error: {name} has no vision tower")
        model.model.float()
        with torch.no_grad():
            word = word_vectors(model)
            for mode in MODES:
                scores = score(model, records, args.records.parent, mode, word, console)
                table.add_row(name, mode, f"{scores['color']:.1f}", f"{scores['shape']:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
