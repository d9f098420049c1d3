"""Retrieval with dual encoders: images, speech and texts as L2-normalised vectors in one space.

    from tinyomni import retrieval
    encoder = retrieval.load("path/to/clip")          # a CLIPModel / SiglipModel directory, a tinyomni
    images = encoder.embed(image=["a.png", "b.png"])  # model with towers.json, or a training checkpoint
    texts = encoder.embed(text=["a red star", "a blue circle"])
    encoder.logits(images, texts)                     # transformers' logits_per_image
    model.embed(text="a red star")                    # the same from a loaded tinyomni.Model

Where the towers come from:
- an imported CLIP / SigLIP (checkpoints/clip.py, one line each in checkpoints/families.py);
- a tinyomni model's contrastive towers (retrieval/towers.py): a directory with `towers.json`, or a
  training checkpoint (`<out>/checkpoints/step-N`) taken in a contrastive stage. The shipped
  tinyomni-world has a text tower trained against its own frozen vision tower
  (recipes/tinyomni-world-towers.toml, put in place by retrieval/ship.py), so `retrieval.load("tinyomni-world")`
  and `tinyomni embed --model tinyomni-world` work; its recipe's own pretraining towers were discarded.

A tinyomni model has one text tower per pair: texts are embedded in the image space ("image", the
default) or the speech space (`space="audio"`), whichever the media compared with them are in.
"""

from __future__ import annotations

from typing import Any

# Imported on first use (PEP 562), so `tinyomni embed`'s module and `import tinyomni.retrieval` stay cheap.
_LAZY = {"DualEncoder": "encoder", "SPACES": "encoder", "load": "encoder", "of_model": "encoder",
         "from_towers": "encoder", "from_imported": "encoder"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tinyomni.retrieval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tinyomni.retrieval' has no attribute {name!r}")
