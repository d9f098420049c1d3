"""Put a run's retrieval towers into a model directory, small: `python -m tinyomni.retrieval.ship RUN MODEL_DIR`.

    tinyomni train recipes/tinyomni-world-towers.toml
    python -m tinyomni.retrieval.ship runs/tinyomni-world-towers tinyomni/models/tinyomni-world

A run's `model/towers.*` (tinyomni/retrieval/towers.py) hold every pair in float32 with a copy of its
encoder and a text embedding of one row per token of the tokenizer (49k rows: most of a small tower).
What ships inside a model needs neither:
- a pair whose stage kept its encoder frozen (`lock_encoder = true`, LiT-style) uses the model's own tower,
  so only its text tower and heads are written (`"encoder": "model"`; refused if the encoder differs);
- the text embedding keeps the rows of the tokens its training texts use (the stage's first `--samples`
  samples: their texts and hard-negative captions) and one zero row for any other token;
- tensors are stored in float16.

Texts made of those tokens embed as with the run's towers (to float16 rounding); it prints how far apart
the two are on the first samples' texts and how many tokens of world-retrieval's captions fall outside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tinyomni.errors import CheckpointError, TinyOmniError
from tinyomni.retrieval.towers import (
    TOWERS_CONFIG,
    TOWERS_WEIGHTS,
    Towers,
    compact_vocabulary,
    has_towers,
    load_towers,
    save_towers,
)


def stage_vocabulary(recipe: object, stage_name: str, tokenizer: object, samples: int) -> list[int]:
    """The token ids of the contrastive stage's texts among its first `samples` samples (each sample's
    own text and its hard negatives, cut at the text tower's length as training cut them)."""
    from tinyomni.train.data import RecordSource, hard_negative_captions, pair_text

    stage = next(s for s in recipe.stages if s.name == stage_name)
    source = RecordSource(stage.data)
    limit = stage.text_tower.max_length
    seen: set[int] = set()
    for j in range(samples):
        record, _ = source(j)
        texts = [pair_text(record)]
        texts += [t for t in hard_negative_captions(record, stage.hard_negatives,
                                                    f"tinyomni-negatives/{stage.data.seed}/{stage.name}/{j}")
                  if t is not None]
        for text in texts:
            seen.update(tokenizer.encode_piece(text)[:limit])
    return sorted(seen)


def ship(run: str | Path, model_dir: str | Path, samples: int = 1024, dtype: torch.dtype = torch.float16,
         checkpoint: str | Path | None = None, check_pairs: int = 64) -> Path:
    """Write `run`'s towers (its model/'s, or those of `checkpoint`, one of its checkpoints taken in a
    contrastive stage) into `model_dir` as the module docstring says; returns the towers.json path."""
    from tinyomni.retrieval.towers import from_training_checkpoint
    from tinyomni.train.recipe import recipe_from_dict

    run, model_dir = Path(run), Path(model_dir)
    source = run / "model"
    if checkpoint is None and not has_towers(source):
        raise CheckpointError(f"{source} has no {TOWERS_CONFIG}: train a recipe with a contrastive stage first "
                              "(or pick one of its checkpoints with --checkpoint)")
    recipe = recipe_from_dict(json.loads((run / "recipe.json").read_text()))
    towers = load_towers(source) if checkpoint is None else from_training_checkpoint(checkpoint)
    contrastive = [s for s in recipe.stages if s.kind == "contrastive"]
    compact: Towers = towers
    for name in towers.pairs:
        stage = [s for s in contrastive if s.tower == name][-1]  # the last stage of a tower made its pair
        if not stage.lock_encoder:
            raise CheckpointError(f"stage {stage.name!r} trained its encoder (lock_encoder = false): its pair does "
                                  f"not fit the model's {name} tower; keep it with its own encoder (save_towers)")
        vocabulary = stage_vocabulary(recipe, stage.name, towers.tokenizer, samples)
        print(f"{name}: {len(vocabulary)} tokens in the texts of stage {stage.name!r}'s first {samples} samples",
              file=sys.stderr)
        compact = compact_vocabulary(compact, name, vocabulary)
    for file in (TOWERS_CONFIG, TOWERS_WEIGHTS):  # written whole below; a half-old pair must not remain
        (model_dir / file).unlink(missing_ok=True)
    save_towers(model_dir, compact, dtype=dtype, share_encoder=True)
    for file in (TOWERS_CONFIG, TOWERS_WEIGHTS):  # readable like the model's other files (safetensors writes 0600)
        (model_dir / file).chmod(0o644)
    _report(towers, model_dir, check_pairs)
    return model_dir / TOWERS_CONFIG


def _report(full: Towers, model_dir: Path, n: int) -> None:
    """How close the shipped towers embed to the run's, and what world-retrieval's captions lose."""
    from tinyomni.eval.tasks import world_retrieval_pairs
    from tinyomni.retrieval.encoder import from_towers

    shipped = load_towers(model_dir)
    pairs = world_retrieval_pairs(n)
    texts = [p.text for p in pairs]
    a, b = from_towers(full, "run"), from_towers(shipped, "shipped")
    if "vision" in full.pairs:
        text_gap = float((a.embed(text=texts) - b.embed(text=texts)).abs().max())
        image_gap = float((a.embed(image=[p.image for p in pairs[:16]]) - b.embed(image=[p.image for p in pairs[:16]]))
                          .abs().max())
        known = set(shipped.vocabularies.get("vision", []))
        tokens = [t for text in texts for t in shipped.tokenizer.encode_piece(text)]
        outside = sum(t not in known for t in tokens)
        print(f"vision: world-retrieval's first {len(texts)} captions: {outside} of {len(tokens)} tokens outside "
              f"the vocabulary; largest embedding difference from the run's towers: text {text_gap:.2e}, "
              f"image {image_gap:.2e}", file=sys.stderr)
    size = (model_dir / TOWERS_WEIGHTS).stat().st_size + (model_dir / TOWERS_CONFIG).stat().st_size
    print(f"wrote {model_dir / TOWERS_CONFIG} and {TOWERS_WEIGHTS}: {size / 1e6:.2f} MB", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinyomni.retrieval.ship", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a training run folder (its model/ has towers.json)")
    p.add_argument("model_dir", help="the model directory to add them to (its model.safetensors holds the encoder)")
    p.add_argument("--checkpoint", help="one of the run's checkpoints (<run>/checkpoints/step-N) instead of its model")
    p.add_argument("--samples", type=int, default=1024, help="samples of the stage whose tokens are kept")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args(argv)
    try:
        ship(args.run, args.model_dir, args.samples, getattr(torch, args.dtype), args.checkpoint)
    except TinyOmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
