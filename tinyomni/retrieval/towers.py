"""The contrastive towers of a tinyomni model, kept for retrieval: `towers.json` + `towers.safetensors`.

Contrastive pretraining (tinyomni/train/contrastive.py) trains an encoder against a small text tower
with two heads; the omni model keeps only the encoder, and later stages may go on training it. So a
dual encoder is a snapshot taken at the end of its contrastive stage: the encoder as it was then, the
text tower, both heads and the temperature (and SigLIP's bias), one pair per tower ("vision",
"audio"). Saved in a directory (a model checkpoint's, or its own) beside the tokenizer:

    towers.json          {"format": "tinyomni-towers", "version": 1,
                          "pairs": {"vision": {kind, vocab_size, loss, encoder_width, image_size, text_tower,
                                               [encoder: "model"], [vocabulary: [token ids]]}},
                          "vision": VisionConfig, "audio": AudioConfig}
    towers.safetensors   vision.encoder.*, vision.text_tower.*, vision.media_head.*, vision.text_head.*,
                         vision.logit_scale, vision.logit_bias (and audio.* likewise), any float dtype
    tokenizer.json       the model's own (the text tower reads its ids)

Two optional keys keep towers small when they ship inside a model (`save_towers(..., share_encoder=True)`,
`compact_vocabulary`; tinyomni/retrieval/ship.py uses both):
- `"encoder": "model"`: the pair's encoder is the model's own tower, unchanged (a frozen-encoder, LiT-style
  stage trained it): its weights are read from the directory's model.safetensors (`vision_tower.*`), not
  stored twice.
- `"vocabulary"`: the text tower's embedding holds one row per listed token id (the tokens of its training
  texts) and a last row for every other token; a 49k-row table is most of a small tower's size.

`from_training_checkpoint` builds them from a run's checkpoint taken during or at the end of a
contrastive stage (`<out>/checkpoints/step-N`: its `stage_module.*` tensors and the encoder's).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from tinyomni.config import AudioConfig, VisionConfig, _build
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.model.dual_encoder import ContrastivePair, PairConfig
from tinyomni.processing.tokenizer import Tokenizer

TOWERS_CONFIG, TOWERS_WEIGHTS = "towers.json", "towers.safetensors"
FORMAT, VERSION = "tinyomni-towers", 1


@dataclasses.dataclass
class TowerSpec:
    """A TextTowerSpec as towers.json stores it (the recipe's class lives in tinyomni/train)."""

    hidden_size: int = 256
    layers: int = 2
    heads: int = 4
    max_length: int = 48
    embed_dim: int = 256


@dataclasses.dataclass
class Towers:
    """The pairs of one model, the encoders' configs (mean/std, mel bins) and the tokenizer."""

    pairs: dict[str, ContrastivePair]
    vision: VisionConfig | None
    audio: AudioConfig | None
    tokenizer: Tokenizer
    # pair name → the token ids its compact text embedding has rows for (row i: vocabulary[i]; the last
    # row: any other token). Absent: the embedding has a row for every token of the tokenizer.
    vocabularies: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def has_towers(path: str | Path) -> bool:
    return (Path(path) / TOWERS_CONFIG).is_file()


def _encoder(kind: str, vision: VisionConfig | None, audio: AudioConfig | None) -> torch.nn.Module:
    if kind == "vision":
        from tinyomni.model.vision import VisionEncoder

        if vision is None:
            raise CheckpointError("a vision pair needs the vision config")
        return VisionEncoder(vision)
    from tinyomni.model.audio import AudioEncoder

    if audio is None:
        raise CheckpointError("an audio pair needs the audio config")
    return AudioEncoder(audio)


MODEL_WEIGHTS = "model.safetensors"  # a tinyomni model directory's own weights (checkpoints/native.py)


def save_towers(path: str | Path, towers: Towers, dtype: torch.dtype = torch.float32,
                share_encoder: bool = False) -> Path:
    """Write towers.json + towers.safetensors (+ the tokenizer when the directory has none) into `path`.

    `dtype`: of the floating-point tensors (float16 halves the file). `share_encoder`: `path` is a model
    directory whose model.safetensors holds each pair's encoder as it is (`vision_tower.*`, compared at
    that file's precision); the encoders are then not written again (CheckpointError if one differs)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pairs = {}
    state: dict[str, torch.Tensor] = {}
    for name, pair in towers.pairs.items():
        c = pair.config
        pairs[name] = {"kind": c.kind, "vocab_size": c.vocab_size, "loss": c.loss, "encoder_width": c.encoder_width,
                       "image_size": c.image_size,
                       "text_tower": {f.name: getattr(c.text_tower, f.name) for f in dataclasses.fields(TowerSpec)}}
        if name in towers.vocabularies:
            pairs[name]["vocabulary"] = list(towers.vocabularies[name])
        own = pair.state_dict()
        if share_encoder:
            _check_model_encoder(path, c.kind, {k[len("encoder."):]: v for k, v in own.items()
                                                if k.startswith("encoder.")})
            pairs[name]["encoder"] = "model"
            own = {k: v for k, v in own.items() if not k.startswith("encoder.")}
        state.update({f"{name}.{k}": (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
                      for k, v in own.items()})
    meta = {"format": FORMAT, "version": VERSION, "pairs": pairs,
            "vision": None if towers.vision is None else dataclasses.asdict(towers.vision),
            "audio": None if towers.audio is None else dataclasses.asdict(towers.audio)}
    save_file(state, str(path / TOWERS_WEIGHTS))
    (path / TOWERS_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    if not (path / "tokenizer.json").is_file():
        towers.tokenizer.save(path)
    return path


def _model_encoder(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """A model directory's `<kind>_tower.*` tensors from its model.safetensors, by their names in the tower."""
    from safetensors import safe_open

    file = path / MODEL_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path}: the towers use the model's {kind} tower, but there is no {MODEL_WEIGHTS}")
    prefix = f"{kind}_tower."
    with safe_open(str(file), "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _check_model_encoder(path: Path, kind: str, encoder: dict[str, torch.Tensor]) -> None:
    model = _model_encoder(path, kind)
    if set(model) != set(encoder):
        raise CheckpointError(f"{path}: the model's {kind} tower is not the pair's encoder (other tensors)")
    for k, v in encoder.items():
        if model[k].shape != v.shape or not torch.equal(v.to(model[k].dtype), model[k]):
            raise CheckpointError(f"{path}: the model's {kind} tower differs from the pair's encoder at {k}: "
                                  "the towers fit another encoder; save them with their own (share_encoder=False)")


def compact_vocabulary(towers: Towers, name: str, vocabulary: list[int]) -> Towers:
    """The towers with pair `name`'s text embedding cut to `vocabulary` (sorted token ids) plus one last row,
    zero, for every other token. Texts made only of those tokens embed exactly as before."""
    pair = towers.pairs[name]
    if name in towers.vocabularies:
        raise ConfigError(f"pair {name!r} already has a compact vocabulary")
    ids = sorted(set(int(i) for i in vocabulary))
    if not ids or ids[0] < 0 or ids[-1] >= pair.config.vocab_size:
        raise ConfigError(f"pair {name!r}: the vocabulary must be token ids in [0, {pair.config.vocab_size})")
    config = dataclasses.replace(pair.config, vocab_size=len(ids) + 1)
    small = ContrastivePair(config, pair.encoder, pair.audio_config)
    state = dict(pair.state_dict())
    table = state["text_tower.embed.weight"]
    state["text_tower.embed.weight"] = torch.cat([table[ids], torch.zeros_like(table[:1])])
    small.load_state_dict(state)
    return dataclasses.replace(towers, pairs={**towers.pairs, name: small.eval()},
                               vocabularies={**towers.vocabularies, name: ids})


def load_towers(path: str | Path) -> Towers:
    """Read what `save_towers` wrote; every tensor is checked against the pairs' shapes."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / TOWERS_CONFIG
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{file} is not a {FORMAT} v{VERSION} file")
    try:
        vision = None if meta.get("vision") is None else _build(VisionConfig, meta["vision"], f"{file} vision")
        audio = None if meta.get("audio") is None else _build(AudioConfig, meta["audio"], f"{file} audio")
        specs = {name: PairConfig(p["kind"], int(p["vocab_size"]), _build(TowerSpec, p["text_tower"], name),
                                  p["loss"], int(p["encoder_width"]), p.get("image_size"))
                 for name, p in meta["pairs"].items()}
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    weights = path / TOWERS_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: {TOWERS_CONFIG} without {TOWERS_WEIGHTS}")
    state = load_file(str(weights))
    pairs, vocabularies = {}, {}
    for name, spec in specs.items():
        pair = ContrastivePair(spec, _encoder(spec.kind, vision, audio), audio)
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
        shared = meta["pairs"][name].get("encoder")
        if shared not in (None, "model"):
            raise CheckpointError(f"{file}: pair {name!r} has encoder {shared!r}; only \"model\" is known")
        if shared == "model":
            own.update({f"encoder.{k}": v for k, v in _model_encoder(path, spec.kind).items()})
        vocabulary = meta["pairs"][name].get("vocabulary")
        if vocabulary is not None:
            if not isinstance(vocabulary, list) or len(vocabulary) + 1 != spec.vocab_size:
                raise CheckpointError(f"{file}: pair {name!r} has a vocabulary of {len(vocabulary or [])} tokens "
                                      f"for a text embedding of {spec.vocab_size} rows (it needs one more)")
            vocabularies[name] = [int(i) for i in vocabulary]
        _load_pair(pair, own, f"{weights} ({name})")
        pairs[name] = pair.eval()
    return Towers(pairs, vision, audio, Tokenizer.from_dir(path), vocabularies)


def _load_pair(pair: ContrastivePair, state: dict[str, torch.Tensor], where: str) -> None:
    expected = pair.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise CheckpointError(f"{where}: the towers do not fit their config (missing {missing[:4]}, "
                              f"unexpected {extra[:4]}, wrong shape {wrong[:4]})")
    pair.load_state_dict(state)


def from_training_checkpoint(path: str | Path) -> Towers:
    """The pair of the contrastive stage a training checkpoint (`<out>/checkpoints/step-N`) was taken in.

    The recipe in its state.json rebuilds the starting model (for the encoder's config, the tokenizer
    and the weights training left alone, e.g. Whisper's fixed positions); the checkpoint gives the
    encoder's trained weights and the stage's text tower and heads (`stage_module.*`)."""
    from tinyomni.train import checkpoint as ckpt
    from tinyomni.train.recipe import recipe_from_dict
    from tinyomni.train.trainer import build_model

    path = Path(path)
    state_file = path / "state.json"
    try:
        saved = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file} is unreadable: {e}") from None
    recipe = recipe_from_dict(saved["recipe"])
    stage = recipe.stages[int(saved["stage"])]
    if stage.kind != "contrastive":
        raise CheckpointError(f"{path} was taken in stage {stage.name!r} ({stage.kind}); its contrastive towers are "
                              "not in it: use a checkpoint from a contrastive stage (the last one of that stage)")
    if ckpt.is_sharded(path):
        raise CheckpointError(f"{path} is sharded: consolidate it first (python -m tinyomni.train.consolidate)")
    _, weights, _ = ckpt.load_checkpoint(path)
    model = build_model(recipe)
    config = model.config
    prefix = f"{stage.tower}_tower."
    encoder = model.model.vision_tower if stage.tower == "vision" else model.model.audio_tower
    if encoder is None:
        raise CheckpointError(f"{path}: the recipe's model has no {stage.tower} tower")
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    encoder.load_state_dict({**encoder.state_dict(), **own})
    width = config.vision.hidden_size if stage.tower == "vision" else config.audio.d_model
    spec = PairConfig(stage.tower, len(model.tokenizer), stage.text_tower, stage.loss, width,
                      (stage.image_size or config.vision.image_size) if stage.tower == "vision" else None)
    pair = ContrastivePair(spec, encoder, config.audio)
    heads = {k[len("stage_module."):]: v for k, v in weights.items()
             if k.startswith("stage_module.") and not k.startswith("stage_module.tag_head.")}
    _load_pair(pair, {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **heads}, str(path))
    return Towers({stage.tower: pair.eval()}, config.vision if stage.tower == "vision" else None,
                  config.audio if stage.tower == "audio" else None, model.tokenizer)


def from_contrastive_module(module: torch.nn.Module, stage: Any, config: Any, tokenizer: Tokenizer) -> Towers:
    """A snapshot of a live `ContrastiveModule` (the trainer's, at the end of its stage): a copy of its
    encoder, so later stages that go on training the omni model's encoder leave the pair as it was."""
    import copy

    kind = stage.tower
    width = config.vision.hidden_size if kind == "vision" else config.audio.d_model
    spec = PairConfig(kind, module.text_tower.embed.num_embeddings, stage.text_tower, stage.loss, width,
                      (stage.image_size or config.vision.image_size) if kind == "vision" else None)
    pair = ContrastivePair(spec, copy.deepcopy(module.encoder).float(), config.audio)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("tag_head.")}
    _load_pair(pair, {k: v.detach().float() for k, v in state.items()}, f"stage {stage.name!r}")
    return Towers({kind: pair.eval()}, config.vision if kind == "vision" else None,
                  config.audio if kind == "audio" else None, tokenizer)


def collect_towers(folder: str | Path, model_dir: str | Path) -> Path | None:
    """Every stage's towers saved under `folder` (<out>/towers/<stage>/, later stages of a tower win)
    merged into one towers.json + towers.safetensors in `model_dir`; None when there are none."""
    folder = Path(folder)
    parts = sorted(p for p in folder.iterdir() if has_towers(p)) if folder.is_dir() else []
    if not parts:
        return None
    loaded = [load_towers(p) for p in sorted(parts, key=lambda p: (p / TOWERS_CONFIG).stat().st_mtime)]
    merged = Towers({}, None, None, loaded[-1].tokenizer)
    for towers in loaded:
        merged.pairs.update(towers.pairs)
        merged.vocabularies = {**{k: v for k, v in merged.vocabularies.items() if k not in towers.pairs},
                               **towers.vocabularies}
        merged.vision = towers.vision or merged.vision
        merged.audio = towers.audio or merged.audio
    return save_towers(model_dir, merged)
