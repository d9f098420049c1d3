"""The runtime of retrieval: `DualEncoder` (prepare inputs, embed, score) and `load` (see the package
docstring, tinyomni/retrieval/__init__.py, for what it reads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinyomni.errors import CheckpointError, InputError

SPACES = ("image", "audio")


def _as_list(value: Any) -> tuple[list[Any], bool]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError("nothing to embed: the list is empty")
        return list(value), True
    return [value], False


class DualEncoder:
    """Towers + how their inputs are prepared; `embed` is the one entry point."""

    def __init__(self, name: str, tokenizer: Any, spaces: dict[str, Any], batch_size: int = 32) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self._spaces = spaces  # space → _Space
        self.batch_size = batch_size

    @property
    def spaces(self) -> list[str]:
        return list(self._spaces)

    def _space(self, space: str) -> Any:
        if space not in self._spaces:
            raise InputError(f"{self.name} has no {space} tower (it embeds: {', '.join(self._spaces) or 'nothing'})")
        return self._spaces[space]

    @torch.no_grad()
    def embed(self, image: Any = None, text: str | Sequence[str] | None = None, audio: Any = None,
              space: str = "image") -> Tensor:
        """L2-normalised float32 embeddings: [D] for one input, [N, D] for a list. Exactly one of
        `image` (paths, bytes, data URLs, PIL images), `text`, `audio` (files, bytes, arrays at 16 kHz);
        `space` says which pair's text tower embeds a text ("image" or "audio")."""
        given = [(k, v) for k, v in (("image", image), ("text", text), ("audio", audio)) if v is not None]
        if len(given) != 1:
            raise InputError("embed takes exactly one of image=, text=, audio=")
        kind, value = given[0]
        if space not in SPACES:
            raise InputError(f"unknown space {space!r}; use one of {', '.join(SPACES)}")
        items, many = _as_list(value)
        target = self._space("image" if kind == "image" else "audio" if kind == "audio" else space)
        fn = target.embed_texts if kind == "text" else target.embed_media
        if kind == "text" and not all(isinstance(t, str) for t in items):
            raise InputError("text= takes a string or a list of strings")
        out = torch.cat([fn(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)])
        return out if many else out[0]

    def logits(self, media: Tensor, text: Tensor, space: str = "image") -> Tensor:
        """Similarities [media, text] as the model was trained to score them (CLIP: cosine × scale;
        SigLIP: + bias), i.e. transformers' logits_per_image."""
        return self._space(space).logits(media.reshape(-1, media.shape[-1]), text.reshape(-1, text.shape[-1]))


class _Space:
    """One embedding space: how media and texts become tensors, and the modules that embed them."""

    def __init__(self, prepare_media: Any, media_fn: Any, prepare_text: Any, text_fn: Any, logits: Any,
                 module: torch.nn.Module) -> None:
        self.prepare_media, self.media_fn = prepare_media, media_fn
        self.prepare_text, self.text_fn = prepare_text, text_fn
        self.logits, self.module = logits, module

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def embed_media(self, items: list[Any]) -> Tensor:
        args = [a.to(self._device()) if isinstance(a, Tensor) else a for a in self.prepare_media(items)]
        return self.media_fn(*args).cpu()

    def embed_texts(self, texts: list[str]) -> Tensor:
        args = [a.to(self._device()) if isinstance(a, Tensor) else a for a in self.prepare_text(texts)]
        return self.text_fn(*args).cpu()


# --- preparing inputs --------------------------------------------------------------------------------
def pad_ids(rows: list[list[int]], pad_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-padded ids [N, L] and their mask (True on real tokens)."""
    length = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return ids, mask


def _images(items: list[Any], size: int, mean: Any, std: Any, resize: str = "tiles",
            shortest_edge: int | None = None, pad_square: bool = False) -> Tensor:
    from tinyomni.processing.image import preprocess_image

    return torch.cat([preprocess_image(x, image_size=size, min_tiles=1, max_tiles=1, use_thumbnail=False, mean=mean,
                                       std=std, resize=resize, shortest_edge=shortest_edge, pad_square=pad_square)
                      for x in items])


def _audio(items: list[Any], n_mels: int) -> tuple[Tensor, Tensor]:
    """Log-mel features right-padded to an even frame count, and which frames are real (as training)."""
    from tinyomni.processing.audio import load_audio, log_mel_spectrogram

    mels = [log_mel_spectrogram(load_audio(x), n_mels=n_mels) for x in items]
    frames = max(m.shape[-1] for m in mels)
    frames += frames % 2
    media = torch.zeros(len(mels), n_mels, frames)
    mask = torch.zeros(len(mels), frames, dtype=torch.bool)
    for i, m in enumerate(mels):
        media[i, :, :m.shape[-1]] = m
        mask[i, :m.shape[-1]] = True
    return media, mask


def _hf_text_ids(tokenizer: Any, texts: list[str], max_length: int, pad_to_max: bool) -> list[Tensor]:
    """CLIP / SigLIP ids as their tokenizers make them (tokenizer.json's own start/end tokens),
    truncated to the text model's length; SigLIP pads to that length and reads no mask (as it was
    trained), CLIP pads to the longest text with a mask."""
    backend = tokenizer.backend
    rows = []
    for text in texts:
        ids = backend.encode(text, add_special_tokens=True).ids
        if len(ids) > max_length:  # keep the end-of-text token the pooling reads
            ids = ids[:max_length - 1] + ids[-1:]
        rows.append(ids)
    ids, mask = pad_ids(rows, tokenizer.pad_token_id, max_length if pad_to_max else None)
    return [ids] if pad_to_max else [ids, mask]


# --- loading -------------------------------------------------------------------------------------------
def from_imported(imported: Any, name: str) -> DualEncoder:
    """A CLIP / SigLIP checkpoint read by checkpoints/clip.py."""
    model, v, t = imported.model, imported.model.config.vision, imported.model.config.text
    image = imported.image

    def prepare_media(items: list[Any]) -> list[Tensor]:
        return [_images(items, v.image_size, v.image_mean, v.image_std, image.get("image_resize", "tiles"),
                        image.get("image_shortest_edge"), bool(image.get("image_pad_to_square")))]

    space = _Space(prepare_media, model.embed_image,
                   lambda texts: _hf_text_ids(imported.tokenizer, texts, t.max_position_embeddings,
                                              imported.pad_to_max_length),
                   model.embed_text, model.logits, model)
    return DualEncoder(name, imported.tokenizer, {"image": space})


def _vocabulary_rows(vocabulary: list[int] | None, rows: int) -> Tensor | None:
    """Token id → row of a compact text embedding (retrieval/towers.py): its vocabulary's tokens in
    order, every other token (ids beyond the table too) the last row. None: ids are rows."""
    if vocabulary is None:
        return None
    table = torch.full((max(vocabulary) + 2,), rows - 1, dtype=torch.long)
    table[torch.tensor(vocabulary, dtype=torch.long)] = torch.arange(len(vocabulary))
    return table


def from_towers(towers: Any, name: str) -> DualEncoder:
    """A tinyomni model's contrastive towers (retrieval/towers.py)."""
    spaces = {}
    tokenizer = towers.tokenizer
    for pair_name, pair in towers.pairs.items():
        spec = pair.config

        rows = _vocabulary_rows(towers.vocabularies.get(pair_name), spec.vocab_size)

        def prepare_text(texts: list[str], spec: Any = spec, rows: Tensor | None = rows) -> list[Tensor]:
            # As pair_example makes them in training: the tokenizer's pieces, cut at max_length.
            ids, mask = pad_ids([tokenizer.encode_piece(t)[:spec.text_tower.max_length] or [tokenizer.pad_token_id]
                                 for t in texts], tokenizer.pad_token_id)
            return [ids if rows is None else rows[ids.clamp(0, len(rows) - 1)], mask]

        if spec.kind == "vision":
            v = towers.vision

            def prepare_media(items: list[Any], spec: Any = spec, v: Any = v) -> list[Any]:
                return [_images(items, spec.image_size or v.image_size, v.image_mean, v.image_std), None]
        else:
            n_mels = towers.audio.num_mel_bins

            def prepare_media(items: list[Any], n_mels: int = n_mels) -> list[Any]:
                return list(_audio(items, n_mels))
        spaces["image" if pair_name == "vision" else "audio"] = _Space(
            prepare_media, pair.embed_media, prepare_text, pair.embed_text, pair.logits, pair)
    return DualEncoder(name, tokenizer, spaces)


def load(spec: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """A dual encoder from a CLIP / SigLIP directory, a directory with towers.json (a tinyomni model's
    or its own), a training checkpoint of a contrastive stage, or "tinyomni-world"."""
    from tinyomni.retrieval import towers as tw

    text = str(spec)
    path = Path(text).expanduser()
    if text == "tinyomni-world" and not path.exists():
        from tinyomni.api import REFERENCE_MODEL_DIR

        path = REFERENCE_MODEL_DIR
    if not path.is_dir():
        raise CheckpointError(f"no dual encoder at {text!r}: expected a CLIP / SigLIP directory, a tinyomni model "
                              "with towers.json, or a training checkpoint of a contrastive stage")
    if tw.has_towers(path):
        encoder = from_towers(tw.load_towers(path), text)
    elif (path / "state.json").is_file() and (path / "weights.safetensors").is_file():
        encoder = from_towers(tw.from_training_checkpoint(path), text)
    elif (path / "config.json").is_file() and _model_type(path) == "tinyomni":
        raise CheckpointError(
            f"{text}: this tinyomni model keeps no contrastive towers (no {tw.TOWERS_CONFIG}): its recipe threw the "
            "text towers away after pretraining. Embed with a checkpoint of its contrastive stage "
            "(<run>/checkpoints/step-N), towers saved from one (tinyomni.retrieval.towers.save_towers), "
            "or a CLIP / SigLIP directory")
    else:
        from tinyomni.checkpoints.families import family_for

        architecture, family = family_for(path)
        if family.embed is None:
            raise CheckpointError(f"{text}: {architecture} is not a dual encoder (supported: CLIPModel, SiglipModel, "
                                  "or a tinyomni model's contrastive towers)")
        encoder = from_imported(family.embed(path), text)
    for space in encoder._spaces.values():
        space.module.to(device).eval()
    return encoder


def _model_type(path: Path) -> str | None:
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def of_model(model: Any) -> DualEncoder:
    """The dual encoder of a loaded tinyomni.Model: its towers, read from the directory it came from
    (once; kept on the model)."""
    cached = getattr(model, "_dual_encoder", None)
    if cached is not None:
        return cached
    encoder = load(model.name, device=next(model.model.parameters()).device)
    model._dual_encoder = encoder
    return encoder
