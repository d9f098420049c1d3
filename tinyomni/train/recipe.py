"""Recipes: one TOML (or YAML) file says what to train, on what, in which stages, with which settings.

    name = "toy"
    [model]                      # what to start from
    base = "smollm2"             # "smollm2" | a .gguf | a HF dir (new encoders) | a tinyomni checkpoint | "tiny"
    # from = "DIR"               # or a whole model to fine-tune as it is (an InternVL dir, anything load takes)
    # vision_from = "tinyomni-world"  # a new model whose vision tower (weights and config) is copied from this
    [run]                        # where and how: out dir, checkpoints, logging, precision
    out = "runs/toy"
    [eval]                       # periodic evaluation through the eval harness (every = 0: off)
    every = 100
    [[stages]]                   # run in order; each names its kind, data, what trains, and its optimiser
    name = "vision-pretrain"
    kind = "contrastive"         # or "sft" (alignment and instruction tuning: loss on assistant tokens)
    ...                          # or "dpo" (preference alignment on chosen/rejected answers)
                                 # or "distill" (KL to a local teacher's logits) or "distill_vision"
                                 # (a vision tower's features from a larger one's)

Every field has a default (see the dataclasses below); unknown fields are errors, so a typo never
silently trains the wrong thing. `load_recipe(path, overrides=["stages.0.steps=10"])` changes fields
from the command line (`--set`), with values parsed as TOML.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from tinyomni.errors import ConfigError
from tinyomni.model.lora import LoraConfig

STAGE_KINDS = ("contrastive", "sft", "dpo", "distill", "distill_vision")
CHAT_KINDS = ("sft", "dpo", "distill")  # stages whose forward is the omni model on chat examples
DISTILL_KINDS = ("distill", "distill_vision")  # stages with a frozen local teacher (train/distill_stage.py)


@dataclass
class ModelSpec:
    base: str = "smollm2"  # see the module docstring; "tiny" is tiny_random_model (tests)
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig fields (new encoders only)
    audio: dict[str, Any] = field(default_factory=dict)  # AudioConfig fields (new encoders only)
    config: dict[str, Any] = field(default_factory=dict)  # other OmniConfig fields: max_tiles, use_thumbnail, ...
    seed: int = 0  # initialisation of the new parts
    # Add CogVLM's visual expert to the decoder (decoder.visual_expert), started from its text weights; train it
    # with `train = ["language_model.model.layers.N.visual_expert", ...]` (tinyomni/model/visual_expert.py).
    visual_expert: bool = False
    # `from` in a recipe: a whole model to fine-tune as it is (an imported InternVL or LLaVA directory, a
    # tinyomni checkpoint, a hub id: anything tinyomni.load takes), in place of `base` and new encoders.
    # The final checkpoint then stores only what training changed, with `base_model` naming this.
    from_: str | None = None
    # A trained vision tower to start a new model from: its weights and its VisionConfig (image size, patch
    # size, conv stem, ...) are copied from this model (anything tinyomni.load takes, e.g. "tinyomni-world"),
    # under a new connector (config.vision_projector) and the `base` decoder. `vision` fields given beside it
    # override the copied config; a change that alters a weight's shape is an error. So connectors can be
    # compared over the same tower (docs/training.md, "Connector comparison on the world").
    vision_from: str | None = None


@dataclass
class DataSpec:
    """Training samples: the synthetic world (endless, seeded) or a JSONL file of records."""

    skills: list[str] | str = "all"  # a list may repeat names to weight skills
    split: str = "train"
    seed: int = 0
    difficulty: dict[str, Any] = field(default_factory=dict)  # Difficulty knobs for every skill
    # A task/world JSONL instead of the world (cycled, reshuffled every epoch); for a dpo stage, preference
    # records (prompt, chosen, rejected; `tinyomni world preferences` makes them from a model's mistakes).
    jsonl: str | None = None
    # LLaVA instruction-tuning data instead: a JSON list (or JSONL) of {"id", "image" (a path or a list),
    # "conversations": [{"from": "human", "value": "<image>\nQuestion"}, {"from": "gpt", "value": ...}]},
    # with images relative to `image_folder` (LLaVA's --image_folder; default: the file's folder).
    llava: str | None = None
    image_folder: str | None = None
    # Chat stages: up to this many more questions about the same picture, as further turns, for world
    # records of a single scene of shapes (colour, shape, count, presence; see world.skills.scene_questions).
    extra_questions: int = 0
    # Replay: this share of the samples comes from a JSONL of chats instead (e.g. the base LLM's own
    # answers to general prompts, made by `python -m tinyomni.train.replay`), so tuning on world data
    # does not wear away what the base model could do.
    replay: str | None = None
    replay_fraction: float = 0.0


@dataclass
class TextTowerSpec:
    """The small text encoder of contrastive pretraining (thrown away afterwards)."""

    hidden_size: int = 256
    layers: int = 2
    heads: int = 4
    max_length: int = 48
    embed_dim: int = 256  # the shared image-text embedding width


@dataclass
class PreferenceSpec:
    """The loss of a `dpo` stage: DPO (Rafailov et al. 2023) against the stage's frozen starting point,
    optionally mixed, as MPO does (Wang et al. 2024, InternVL2-MPO: dpo 0.8, quality 0.2, sft 1.0), with
    a quality term and SFT on the chosen answers. Each term is TRL's of the same name: sigmoid, bco_pair, sft."""

    beta: float = 0.1  # how far the policy may move from the reference (larger: less)
    # e, the share of preference labels assumed flipped. With loss = "sigmoid", conservative DPO (cDPO;
    # TRL's label_smoothing with loss_type "sigmoid" before TRL 1.0): -(1-e)·logσ(βΔ) - e·logσ(-βΔ).
    # With loss = "robust", robust DPO (Chowdhury et al. 2024; TRL's "robust"), unbiased under such
    # flips: (-(1-e)·logσ(βΔ) + e·logσ(-βΔ)) / (1-2e).
    label_smoothing: float = 0.0
    loss: str = "sigmoid"  # "sigmoid" (DPO / cDPO) or "robust"
    dpo_weight: float = 1.0
    # BCO-style quality term: each answer judged on its own, -logσ(β·r_chosen) - logσ(-β·r_rejected),
    # r = log-ratio to the reference (TRL's bco_pair, without BCO's running reward shift).
    quality_weight: float = 0.0
    sft_weight: float = 0.0  # cross-entropy of the chosen answers, per chosen token


@dataclass
class DistillSpec:
    """The teacher and loss of a `distill` or `distill_vision` stage (train/distill_stage.py).

    distill: loss = (1 - alpha)·T²·KL(teacher ‖ student) + alpha·CE(labels), per answer token, the KL
    between the two models' next-token distributions at temperature T (Hinton et al. 2015; T² keeps
    the gradient's scale as T changes). The teacher must share the student's tokenizer.
    distill_vision: the student's vision tower learns to reproduce the teacher's tower outputs (as
    Mini-InternVL distils InternViT-6B into a 300M tower), through a learned linear map when the widths
    differ; the teacher's patch grid is resized to the student's when they differ."""

    teacher: str | None = None  # anything tinyomni.load takes: a checkpoint directory, "tinyomni-world", ...
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the cross-entropy on the data's own answers (0: pure distillation)
    feature_loss: str = "cosine"  # distill_vision: "cosine" (1 - cos per patch) or "mse"


@dataclass
class StageSpec:
    name: str = "stage"
    kind: str = "sft"
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # samples per optimizer step, over all processes and micro-batches
    micro_batch_size: int | None = None  # per process and forward; None = batch_size / processes
    lr: float = 1e-4  # peak learning rate of every trained parameter ...
    module_lr: dict[str, float] = field(default_factory=dict)  # ... unless its name starts with a key here
    train: list[str] = field(default_factory=list)  # module-name prefixes trained in full ("" = all)
    lora: LoraConfig | None = None  # LoRA adapters (their lr: module_lr["lora"], else lr)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    clip_grad: float | None = 1.0  # max global gradient norm; None = no clipping
    max_length: int = 2048  # longer samples are dropped (and counted in the log)
    max_tiles: int | None = None  # cap on image tiles (fewer tokens), else the model's
    bucket_batches: int = 1  # length bucketing: sort this many batches' samples by length (1 = off)
    data: DataSpec = field(default_factory=DataSpec)
    # contrastive only
    tower: str = "vision"  # "vision" (images ↔ captions) or "audio" (speech ↔ transcripts)
    image_size: int | None = None  # a smaller tile than the model's is cheaper (positions are resized)
    loss: str = "siglip"  # "siglip" (sigmoid) or "clip" (softmax)
    # Per world caption, this many extra negative captions of the same scene with one object changed
    # (shape, colour or size): in-batch negatives are told apart by colour alone, these are not.
    hard_negatives: int = 0
    # Weight of a bag-of-words loss beside the contrastive one (as in CatLIP, Mehta et al. 2024): the
    # encoder's pooled features predict which words of the descriptions (captions, rendered words,
    # transcripts; not questions) its own text contains. Every word of a caption (each shape, colour,
    # size) is then a direct target, where in-batch negatives reward only what tells the batch's
    # captions apart most easily (colours). 0 = off.
    tag_loss: float = 0.0
    text_tower: TextTowerSpec = field(default_factory=TextTowerSpec)
    # Locked-image tuning (LiT, Zhai et al. 2022): the encoder stays frozen (and its BatchNorm statistics
    # too); only the text tower and the heads learn. For towers that fit an encoder trained further after
    # its pretraining, e.g. the shipped model's (recipes/tinyomni-world-towers.toml).
    lock_encoder: bool = False
    # dpo only
    dpo: PreferenceSpec = field(default_factory=PreferenceSpec)
    # distill and distill_vision only
    distill: DistillSpec = field(default_factory=DistillSpec)

    def validate(self, where: str) -> None:
        _require(self.kind in STAGE_KINDS, f"{where}.kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        _require(self.steps >= 1 and self.batch_size >= 1, f"{where}: steps and batch_size must be >= 1")
        _require(self.tower in ("vision", "audio"), f"{where}.tower must be vision or audio")
        _require(self.loss in ("siglip", "clip"), f"{where}.loss must be siglip or clip")
        _require(self.bucket_batches >= 1, f"{where}.bucket_batches must be >= 1")
        _require(self.hard_negatives >= 0, f"{where}.hard_negatives must be >= 0")
        _require(self.tag_loss >= 0, f"{where}.tag_loss must be >= 0")
        _require(self.kind == "contrastive" or not self.tag_loss, f"{where}.tag_loss is for contrastive stages")
        _require(self.kind == "contrastive" or not self.lock_encoder, f"{where}.lock_encoder is for contrastive stages")
        _require(not (self.lock_encoder and self.tag_loss),
                 f"{where}: tag_loss trains the encoder; not with lock_encoder")
        _require(self.data.extra_questions >= 0, f"{where}.data.extra_questions must be >= 0")
        _require(self.data.jsonl is None or self.data.llava is None, f"{where}.data: jsonl or llava, not both")
        _require(self.data.image_folder is None or self.data.llava is not None,
                 f"{where}.data.image_folder goes with data.llava")
        _require(0.0 <= self.data.replay_fraction < 1.0, f"{where}.data.replay_fraction must be in [0, 1)")
        _require((self.data.replay is None) == (self.data.replay_fraction == 0.0),
                 f"{where}.data: replay and replay_fraction go together")
        if self.kind == "contrastive":
            _require(self.data.replay is None and not self.data.extra_questions,
                     f"{where}.data: replay and extra_questions are for chat (sft) stages")
        if self.kind in CHAT_KINDS:
            _require(bool(self.train) or self.lora is not None, f"{where}: say what trains (train = [...] or lora)")
        if self.kind == "dpo":
            d = self.dpo
            _require(self.data.replay is None and not self.data.extra_questions,
                     f"{where}.data: replay and extra_questions are for sft stages")
            _require(d.beta > 0, f"{where}.dpo.beta must be > 0")
            _require(d.loss in ("sigmoid", "robust"), f"{where}.dpo.loss must be sigmoid or robust")
            _require(0.0 <= d.label_smoothing < 0.5, f"{where}.dpo.label_smoothing must be in [0, 0.5)")
            weights = (d.dpo_weight, d.quality_weight, d.sft_weight)
            _require(min(weights) >= 0 and max(weights) > 0, f"{where}.dpo: weights must be >= 0, one of them > 0")
        if self.kind in DISTILL_KINDS:
            d = self.distill
            _require(bool(d.teacher), f"{where}.distill.teacher: name the teacher (anything tinyomni.load takes)")
            _require(d.temperature > 0, f"{where}.distill.temperature must be > 0")
            _require(0.0 <= d.alpha <= 1.0, f"{where}.distill.alpha must be in [0, 1]")
            _require(d.feature_loss in ("cosine", "mse"), f"{where}.distill.feature_loss must be cosine or mse")
        if self.kind == "distill_vision":
            _require(self.tower == "vision", f"{where}: distill_vision distils the vision tower (tower = \"vision\")")
            _require(self.data.replay is None and not self.data.extra_questions,
                     f"{where}.data: replay and extra_questions are for chat stages")


@dataclass
class RunSpec:
    out: str = "runs/train"
    seed: int = 0
    autocast: str = "bfloat16"  # bf16 autocast on CPU (AMX) and CUDA; "none" = float32
    save_every: int = 100  # global steps between checkpoints (and one at every stage end)
    keep_checkpoints: int = 2
    log_every: int = 10
    workers: int = 0  # DataLoader processes preparing batches ahead (0 = in the training process)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    lora_export: str = "adapter"  # final model: "adapter" (kept apart, small) or "merged" (into the weights)
    # Under torchrun: "ddp" (every process holds the whole model) or "fsdp" (fully_shard per decoder layer;
    # chat stages only; checkpoints saved sharded with torch.distributed.checkpoint).
    distributed: str = "ddp"


@dataclass
class EvalSpec:
    every: int = 0  # global steps between evaluations (0 = only at the end if at_end, else never)
    at_end: bool = False
    skills: list[str] | str = "all"
    split: str = "val"
    n: int = 4  # samples per skill
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 16
    difficulty: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelSpec = field(default_factory=ModelSpec)
    run: RunSpec = field(default_factory=RunSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stages: list[StageSpec] = field(default_factory=list)

    def validate(self) -> None:
        _require(bool(self.stages), "a recipe needs at least one [[stages]] table")
        names = [s.name for s in self.stages]
        _require(len(set(names)) == len(names), f"stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages.{i}")
        _require(self.run.autocast in ("bfloat16", "none"), "run.autocast must be bfloat16 or none")
        _require(self.run.lora_export in ("adapter", "merged"), "run.lora_export must be adapter or merged")
        _require(self.run.distributed in ("ddp", "fsdp"), "run.distributed must be ddp or fsdp")
        _require(self.model.vision_from is None or self.model.from_ is None,
                 "model.vision_from starts a new model's vision tower; a model given by model.from has its own")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = tomllib.loads(text)
    except Exception as e:  # tomllib / yaml parse errors
        raise ConfigError(f"{path} does not parse: {e}") from None
    for item in overrides or []:
        apply_override(raw, item)
    try:
        recipe = recipe_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for stage in recipe.stages:  # data files named relative to the recipe, wherever it is run from
        for name in ("jsonl", "replay", "llava", "image_folder"):
            value = getattr(stage.data, name)
            if value is not None and not Path(value).is_absolute() and (path.parent / value).exists():
                setattr(stage.data, name, str(path.parent / value))
        teacher = stage.distill.teacher  # a teacher directory beside the recipe, likewise
        if teacher and not Path(teacher).is_absolute() and (path.parent / teacher).is_dir():
            stage.distill.teacher = str(path.parent / teacher)
    return recipe


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    raw = json.loads(json.dumps(raw))  # a deep copy, and TOML dates etc. would fail loudly here
    stages = []
    for i, s in enumerate(raw.pop("stages", [])):
        s = dict(s)
        where = f"stages.{i}"
        sub = {"data": _build(DataSpec, s.pop("data", {}), f"{where}.data"),
               "text_tower": _build(TextTowerSpec, s.pop("text_tower", {}), f"{where}.text_tower"),
               "dpo": _build(PreferenceSpec, s.pop("dpo", {}), f"{where}.dpo"),
               "distill": _build(DistillSpec, s.pop("distill", {}), f"{where}.distill")}
        lora = s.pop("lora", None)
        sub["lora"] = None if lora is None else _build(LoraConfig, lora, f"{where}.lora")
        if "betas" in s:
            s["betas"] = tuple(s["betas"])
        stages.append(_build(StageSpec, {**s, **sub}, where))
    model = raw.pop("model", {})
    if isinstance(model, dict) and "from" in model:  # `from` is the recipe's word, a Python keyword: the field is from_
        model = {**model, "from_": model["from"]}
        del model["from"]
    recipe = Recipe(
        model=_build(ModelSpec, model, "model"),
        run=_build(RunSpec, raw.pop("run", {}), "run"),
        eval=_build(EvalSpec, raw.pop("eval", {}), "eval"),
        stages=stages,
        **_known(Recipe, raw, "recipe"),
    )
    recipe.validate()
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.0.c=value` sets raw["a"]["b"][0]["c"]; the value is TOML (a bare word is a string)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    node: Any = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _known(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {where} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return data


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    try:
        return cls(**_known(cls, data, where))
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
