"""Distillation from a local teacher: the pieces of `distill` and `distill_vision` stages.

    [[stages]]
    kind = "distill"                 # the student's answer-token distributions pulled to the teacher's
    lora = { r = 8, alpha = 16 }
    distill = { teacher = "runs/big/model", temperature = 2.0, alpha = 0.1 }

    [[stages]]
    kind = "distill_vision"          # the student's vision tower reproduces a larger tower's features
    distill = { teacher = "tinyomni-world", feature_loss = "cosine" }

`distill`: each record is prepared twice, once by the student's processor and once by the teacher's
(their towers may want other tile sizes or token counts), and the two must agree on the answer tokens;
the loss is KL(teacher ‖ student) at temperature T on those tokens (`distillation_loss`). The teacher
is loaded once, frozen, in eval mode, and runs under no_grad; only the student (in full or through
LoRA) trains. `distill_vision`: one image per record, each tower with its own preprocessing, and
cosine or MSE between the student's patch features (through a learned linear map when the widths
differ) and the teacher's (resized to the student's grid when the grids differ).
The trainer (trainer.py) runs these as it runs the other kinds: same data order, checkpoints, logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni import api
from tinyomni.config import VisionConfig
from tinyomni.errors import ConfigError, InputError
from tinyomni.train.data import (
    IGNORE,
    ChatBatch,
    ChatExample,
    StageBatches,
    chat_example,
    collate_chat,
    record_messages,
)
from tinyomni.train.recipe import StageSpec

# --- the teacher -----------------------------------------------------------------------------------

def load_teacher(spec: str, device: torch.device, dtype: torch.dtype) -> api.Model:
    """The teacher, frozen: eval mode (no dropout, BatchNorm statistics fixed), no gradients."""
    teacher = api.load(spec, device=device, dtype=dtype)
    teacher.model.eval()
    teacher.model.requires_grad_(False)
    return teacher


def check_same_tokenizer(student: api.Model, teacher: api.Model) -> None:
    """Logit distillation compares the two models token by token: the ids must mean the same text."""
    s, t = student.tokenizer, teacher.tokenizer
    if len(s) != len(t):
        raise ConfigError(f"the teacher's tokenizer has {len(t)} tokens and the student's {len(s)}: logit "
                          "distillation needs the same tokenizer (across tokenizers, distil through data: "
                          "`tinyomni distill` writes the teacher's answers as SFT data)")
    sv, tv = s.backend.get_vocab(with_added_tokens=True), t.backend.get_vocab(with_added_tokens=True)
    if sv != tv:
        token = next(k for k in sorted(set(sv) | set(tv)) if sv.get(k) != tv.get(k))
        raise ConfigError(f"the teacher's and the student's tokenizers differ: {token!r} is id {tv.get(token)} "
                          f"for the teacher and {sv.get(token)} for the student; logit distillation needs the "
                          "same token ids")
    for name, model in (("student", student), ("teacher", teacher)):
        if model.config.decoder.vocab_size < len(s):
            raise ConfigError(f"the {name}'s LM head has {model.config.decoder.vocab_size} rows for {len(s)} tokens")


# --- the loss --------------------------------------------------------------------------------------

def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
                      vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """(KL, CE) summed over N answer tokens, from both models' logits [N, V] there and the labels [N]:
    KL = Σ_tokens Σ_v p_t(v) (log p_t(v) - log p_s(v)) with p = softmax(logits / T), and the student's
    cross-entropy on the labels (at T = 1). `vocab` cuts padded LM-head rows (never a token) off both."""
    if vocab is not None:
        student_logits, teacher_logits = student_logits[:, :vocab], teacher_logits[:, :vocab]
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                          f"{tuple(student_logits.shape)}")
    s, t = student_logits.float(), teacher_logits.float()
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    ce = F.cross_entropy(s, targets, reduction="sum")
    return kl, ce


# --- distill examples and batches ------------------------------------------------------------------

@dataclass
class DistillExample:
    """A record as the student sees it and as the teacher does (None: exactly the same input)."""

    index: int
    student: ChatExample
    teacher: ChatExample | None

    @property
    def length(self) -> int:
        return max(self.student.length, self.teacher.length if self.teacher is not None else 0)


@dataclass
class DistillBatch:
    student: ChatBatch
    teacher: ChatBatch | None  # None: the teacher reads the student's batch
    samples: int
    indices: list[int] = field(default_factory=list)

    @property
    def target_tokens(self) -> int:
        return self.student.target_tokens


def distill_example(student: Any, teacher: Any, stage: StageSpec) -> Callable[[int, dict, Path | None],
                                                                              DistillExample]:
    """Builds DistillExamples with both processors (ChatProcessor); the answers must tokenize alike."""
    make_student, make_teacher = chat_example(student, stage), chat_example(teacher, stage)

    def make(index: int, record: dict[str, Any], root: Path | None) -> DistillExample:
        s, t = make_student(index, record, root), make_teacher(index, record, root)
        if [x for x in s.labels if x != IGNORE] != [x for x in t.labels if x != IGNORE]:
            raise InputError(f"{record.get('id', index)}: the teacher's and the student's chat templates give "
                             "different answer tokens, so their logits cannot be compared token by token")
        same = (s.input_ids == t.input_ids and _same_tensor(s.pixel_values, t.pixel_values)
                and s.qformer_input_ids == t.qformer_input_ids and s.image_layouts == t.image_layouts
                and len(s.audio_features) == len(t.audio_features)
                and all(torch.equal(a, b) for a, b in zip(s.audio_features, t.audio_features)))
        return DistillExample(index, s, None if same else t)

    return make


def _same_tensor(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


def collate_distill(examples: list[DistillExample], pad_id: int) -> DistillBatch:
    student = collate_chat([e.student for e in examples], pad_id)
    if all(e.teacher is None for e in examples):
        return DistillBatch(student, None, len(examples), student.indices)
    teacher = collate_chat([e.teacher or e.student for e in examples], pad_id)
    return DistillBatch(student, teacher, len(examples), student.indices)


# --- distill_vision examples and batches -----------------------------------------------------------

@dataclass
class ImagePairExample:
    """One image, preprocessed for the student's tower and for the teacher's (one tile each)."""

    index: int
    student: Tensor  # [3, S, S]
    teacher: Tensor  # [3, S', S']
    length: int = 1


@dataclass
class ImagePairBatch:
    student: Tensor  # [B, 3, S, S]
    teacher: Tensor  # [B, 3, S', S']
    samples: int
    indices: list[int] = field(default_factory=list)


def record_image(record: dict[str, Any], root: Path | None) -> Any:
    """The first image of a record (world, LLaVA or chat messages; a video's first frame), or None."""
    image = record.get("image") or record.get("images") or record.get("video")
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if image is not None:
        relative = isinstance(image, str) and not image.startswith("data:") and not Path(image).is_absolute()
        if relative and root is not None:
            image = str(root / image)
        return image
    if "messages" in record:
        for message in record_messages(record, root):
            for part in message["content"] if isinstance(message.get("content"), list) else []:
                if part.get("type") == "image":
                    return part["image"]
                if part.get("type") == "video" and isinstance(part.get("video"), list) and part["video"]:
                    return part["video"][0]
    return None


def image_pair_example(student: VisionConfig, teacher: VisionConfig) -> Callable[[int, dict, Path | None],
                                                                                ImagePairExample]:
    from tinyomni.processing.image import preprocess_image

    def tile(image: Any, v: VisionConfig) -> Tensor:
        return preprocess_image(image, image_size=v.image_size, min_tiles=1, max_tiles=1, use_thumbnail=False,
                                mean=v.image_mean, std=v.image_std)[0]

    def make(index: int, record: dict[str, Any], root: Path | None) -> ImagePairExample:
        image = record_image(record, root)
        if image is None:
            raise InputError(f"{record.get('id', index)}: a distill_vision stage needs records with an image")
        if isinstance(image, str) and not image.startswith("data:") and not Path(image).is_file():
            raise InputError(f"{record.get('id', index)}: image not found: {image}")
        return ImagePairExample(index, tile(image, student), tile(image, teacher))

    return make


def collate_image_pairs(examples: list[ImagePairExample], pad_id: int) -> ImagePairBatch:
    return ImagePairBatch(torch.stack([e.student for e in examples]), torch.stack([e.teacher for e in examples]),
                          len(examples), [e.index for e in examples])


class DistillBatches(StageBatches):
    """StageBatches (same order, same resumability) with the distillation stages' own batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.collate = collate_image_pairs if self.stage.kind == "distill_vision" else collate_distill


# --- vision feature distillation -------------------------------------------------------------------

class VisionDistillModule(nn.Module):
    """The student's vision tower (`encoder`, shared with the omni model: what the stage trains), a
    linear map to the teacher's width (an identity when they match; thrown away afterwards), and the
    frozen teacher tower, kept outside the module's parameters and state (not trained, not saved)."""

    def __init__(self, encoder: nn.Module, teacher: nn.Module, loss: str) -> None:
        super().__init__()
        self.encoder = encoder
        self._teacher = [teacher]  # a list: no submodule, so no parameters, state or DDP buffers of it
        self.loss_kind = loss
        s, t = encoder.config.hidden_size, teacher.config.hidden_size
        self.map: nn.Module = nn.Linear(s, t) if s != t else nn.Identity()

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def per_sample(self, batch: ImagePairBatch) -> Tensor:
        """[B]: each image's loss, averaged over the student's patches."""
        student = self.encoder(batch.student.to(_dtype(self.encoder)))[:, self.encoder.num_prefix_tokens:]
        with torch.no_grad():
            teacher = self.teacher(batch.teacher.to(_dtype(self.teacher)))[:, self.teacher.num_prefix_tokens:]
            teacher = resize_grid(teacher.float(), student.shape[1])
        student = self.map(student).float()
        if self.loss_kind == "cosine":
            return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean(1)
        return (student - teacher).pow(2).mean((1, 2))

    def forward(self, batch: ImagePairBatch) -> Tensor:
        """The summed loss of the batch's images (the step divides by the global count)."""
        return self.per_sample(batch).sum()


def resize_grid(features: Tensor, tokens: int) -> Tensor:
    """Patch features [B, N, C] on a square grid resized to `tokens` patches (bilinear; antialiased
    when shrinking), so a tower with another image or patch size is compared position by position."""
    n = features.shape[1]
    if n == tokens:
        return features
    side, target = round(n**0.5), round(tokens**0.5)
    if side * side != n or target * target != tokens:
        raise ConfigError(f"cannot align {n} teacher patches with {tokens} student patches (not square grids)")
    grid = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
    grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False, antialias=side > target)
    return grid.flatten(2).transpose(1, 2)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
