"""Training data: records → examples → padded batches, in an order that is a pure function of the step.

Sample `j` of a stage is a fixed record (world sample or JSONL line). The samples of global step `s`
are fixed too, so a resumed run sees exactly the batches an uninterrupted one would, and processes
split the work without talking:

- Without bucketing (`bucket_batches = 1`), step `s` takes samples `s*G .. s*G+G-1` (G = global
  batch); process `r` of `W` takes every W-th of them starting at `r`.
- With bucketing (`bucket_batches = M`), a window of M steps' samples is sorted by length within each
  process, cut into batches, and the batches shuffled with a seed of the window: similar lengths pad
  little, and the order is still a function of the step.

Examples are built by the same processing inference uses: `ChatProcessor.training_example` for
chat (sft) stages and for both answers of a preference (dpo) record, the image/audio front ends for
contrastive pairs.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinyomni.errors import ConfigError, InputError
from tinyomni.processing.chat import ChatProcessor, Prompt, stack_tiles
from tinyomni.processing.tokenizer import Tokenizer
from tinyomni.train.recipe import CHAT_KINDS, DataSpec, StageSpec

if TYPE_CHECKING:
    from tinyomni.processing.llava_next import Layout

IGNORE = -100


# --- records ---------------------------------------------------------------------------------------

class RecordSource:
    """Sample index → (record, folder its media paths are relative to).

    With replay, sample `j` is a replay record when floor((j+1)·f) > floor(j·f) (f = replay_fraction):
    an even spread, the n-th replay sample is replay record n, and the others are the data's own
    samples in order, so both stay pure functions of `j`."""

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self.records: list[dict[str, Any]] | None = None
        self.root: Path | None = None
        self.replay = None if spec.replay is None else RecordSource(DataSpec(jsonl=spec.replay, seed=spec.seed))
        if spec.llava is not None:
            path = Path(spec.llava)
            if not path.is_file():
                raise InputError(f"training data not found: {path}")
            self.records, self.root = read_llava(path), Path(spec.image_folder or path.parent)
            if not self.records:
                raise InputError(f"{path} has no records")
        elif spec.jsonl is not None:
            from tinyomni.world.writers import read_records

            path = Path(spec.jsonl)
            if not path.is_file():
                raise InputError(f"training data not found: {path}")
            self.records, self.root = read_records(path), path.parent
            if not self.records:
                raise InputError(f"{path} has no records")
        else:
            from tinyomni.world.sample import Difficulty

            self.difficulty = Difficulty().with_overrides(spec.difficulty)

    def __call__(self, j: int) -> tuple[dict[str, Any], Path | None]:
        if self.replay is not None:
            before, after = math.floor(j * self.spec.replay_fraction), math.floor((j + 1) * self.spec.replay_fraction)
            if after > before:
                return self.replay(before)
            j -= before
        if self.records is not None:  # a fresh permutation of the file every epoch
            n = len(self.records)
            order = list(range(n))
            random.Random(f"tinyomni-train/{self.spec.seed}/{j // n}").shuffle(order)
            return self.records[order[j % n]], self.root
        from tinyomni.world.generator import WorldStream

        # The stream's own index → (skill, index) mapping, so skill weights work the same way.
        stream = WorldStream(self.spec.skills, self.spec.split, self.spec.seed, self.difficulty, start=j, limit=1)
        return next(iter(stream)), None


# --- examples --------------------------------------------------------------------------------------

@dataclass
class ChatExample:
    index: int
    input_ids: list[int]
    labels: list[int]
    pixel_values: Tensor | None
    audio_features: list[Tensor]
    # What some connectors read beside the pixels, as the Prompt has them: InstructBLIP's Q-Former ids (per
    # tile) and LLaVA-NeXT's grid layouts (per image). Training must pass them as inference does, or it
    # trains another computation than the one served.
    qformer_input_ids: list[list[int]] = field(default_factory=list)
    image_layouts: list[Layout] = field(default_factory=list)

    @classmethod
    def of(cls, index: int, prompt: Prompt, labels: list[int]) -> ChatExample:
        """Sample `index`: a training Prompt (ChatProcessor.training_example) and its labels."""
        return cls(index, prompt.input_ids, labels, prompt.pixel_values, prompt.audio_features,
                   prompt.qformer_input_ids, prompt.image_layouts)

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class PairExample:
    """A contrastive pair: one image tile [3, S, S] or one clip's log-mel [n_mels, frames], and a text;
    plus `stage.hard_negatives` extra negative texts (None where the record has none to make)."""

    index: int
    media: Tensor
    text_ids: list[int]
    text: str
    negative_ids: list[list[int]] = field(default_factory=list)
    negatives: list[str | None] = field(default_factory=list)
    describes: bool = True  # the text says what the media holds (not a question about it): tag_loss's target

    @property
    def length(self) -> int:
        return self.media.shape[-1] if self.media.dim() == 2 else len(self.text_ids)


def chat_example(processor: ChatProcessor, stage: StageSpec) -> Callable[[int, dict, Path | None], ChatExample]:
    def make(index: int, record: dict[str, Any], root: Path | None) -> ChatExample:
        messages = record_messages(record, root)
        if stage.data.extra_questions:
            seed = f"tinyomni-questions/{stage.data.seed}/{stage.name}/{index}"
            messages += extra_turns(record, stage.data.extra_questions, stage.data.split, seed)
        prompt, labels = processor.training_example(messages, max_tiles=stage.max_tiles)
        return ChatExample.of(index, prompt, labels)

    return make


@dataclass
class PreferenceExample:
    """One preference record: the same prompt (and media) answered twice, each a ChatExample whose
    labels cover only its final answer."""

    index: int
    chosen: ChatExample
    rejected: ChatExample

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


def preference_messages(record: dict[str, Any], root: Path | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a preference record, TRL's fields: `prompt` (a string or
    chat messages with any media, OpenAI style; `messages` is accepted too), `chosen` and `rejected`
    (a string or a list of assistant messages)."""
    where = record.get("id", "record")
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise InputError(f"{where}: a preference record needs a `prompt` (a string or a list of messages)")
    answers = []
    for key in ("chosen", "rejected"):
        answer = record.get(key)
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        if not isinstance(answer, list) or not answer or answer[-1].get("role") != "assistant":
            raise InputError(f"{where}: `{key}` must be a string or a list of messages ending with the assistant's")
        answers.append(record_messages({"messages": answer}, root))
    return record_messages({"messages": prompt}, root), answers[0], answers[1]


def last_turn_only(labels: list[int]) -> list[int]:
    """Labels with every target run but the last set to IGNORE: a preference compares the final answers,
    not assistant turns the prompt may hold. Each run is one assistant turn (content + end-of-turn token);
    template text (role headers) always separates two turns."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + labels[start:end] + [IGNORE] * (len(labels) - end)


def world_preference(record: dict[str, Any], seed: str) -> dict[str, Any]:
    """A preference record from a world record with a closed answer set (`candidates`, or `choices`):
    chosen = its answer, rejected = another answer from that set, drawn with `seed`. Model-free pairs,
    for a toy run; `tinyomni world preferences` makes pairs from a model's own mistakes instead."""
    from tinyomni.world.generator import messages

    choices, candidates = record.get("choices"), record.get("candidates")
    options = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]) if choices else candidates
    others = [o for o in options or [] if o not in record["answers"]]
    if not others:
        raise InputError(f"{record.get('id')}: a dpo stage on world data needs skills with a closed answer set "
                         "(color, shape, count, exists, relation, ...); use data.jsonl with preference records")
    return {"id": record.get("id"), "prompt": messages(record, with_answer=False), "chosen": record["answers"][0],
            "rejected": random.Random(seed).choice(others)}


def preference_example(processor: ChatProcessor, stage: StageSpec) -> Callable[[int, dict, Path | None],
                                                                              PreferenceExample]:
    def make(index: int, record: dict[str, Any], root: Path | None) -> PreferenceExample:
        if "chosen" not in record and "answers" in record:  # a world (task) record
            record = world_preference(record, f"tinyomni-preference/{stage.data.seed}/{stage.name}/{index}")
        prompt, chosen, rejected = preference_messages(record, root)
        pair = []
        for answer in (chosen, rejected):  # the media are processed for each (simple; twice the work)
            encoded, labels = processor.training_example(prompt + answer, max_tiles=stage.max_tiles)
            pair.append(ChatExample.of(index, encoded, last_turn_only(labels)))
        return PreferenceExample(index, *pair)

    return make


def extra_turns(record: dict[str, Any], k: int, split: str, seed: str) -> list[dict[str, Any]]:
    """Up to `k` more user/assistant turns about a world record's single scene of shapes (none for
    other records): the picture is encoded once and answers several questions."""
    from tinyomni.world.skills import scene_questions

    objects = (record.get("meta") or {}).get("objects")
    if not objects or record.get("image") is None:
        return []
    turns = []
    for question, answer in scene_questions(objects, random.Random(seed), split, k):
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def record_messages(record: dict[str, Any], root: Path | None) -> list[dict[str, Any]]:
    """Chat messages of a record: its own `messages` (any number of turns and media, OpenAI style,
    media paths relative to the JSONL), or a task/world record's question and answer."""
    # World records carry LLaVA `conversations` too, but their own question/answer fields come first.
    if "conversations" in record and "messages" not in record and "answers" not in record:
        return llava_messages(record, root)
    if "messages" not in record:
        from tinyomni.world.generator import messages

        return messages(record, root=root)
    out = []
    for message in record["messages"]:
        content = message.get("content")
        if isinstance(content, list) and root is not None:
            content = [_resolve_part(part, root) for part in content]
        out.append({**message, "content": content})
    return out


# --- LLaVA instruction-tuning data ----------------------------------------------------------------

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLAVA_IMAGE = "<image>"


def read_llava(path: Path) -> list[dict[str, Any]]:
    """The records of a LLaVA-format file: a JSON list (LLaVA's llava_v1_5_mix665k.json) or JSONL."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is neither a JSON list nor JSONL: {e}") from None
    if isinstance(data, dict):  # a JSONL file of one record
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path} must hold a list of records")
    return data


def llava_messages(record: dict[str, Any], root: Path | None) -> list[dict[str, Any]]:
    """Chat messages of a LLaVA record: "human"/"gpt" turns, each `<image>` in a value replaced by the
    record's next image (LLaVA writes "<image>\n" before the question; the newline is ours to add).
    A record with images but no `<image>` mark gets them before the first human turn, as LLaVA does."""
    where = record.get("id", "record")
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else list(images)
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: `conversations` must be a non-empty list of {{from, value}} turns")
    marks = sum(str(t.get("value", "")).count(LLAVA_IMAGE) for t in turns if isinstance(t, dict))
    if marks not in (0, len(images)):
        raise InputError(f"{where}: {marks} {LLAVA_IMAGE} mark(s) for {len(images)} image(s)")
    resolved = [str(root / i) if root is not None and not Path(i).is_absolute() else i for i in images]
    pending = iter(resolved)
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise InputError(f"{where}: each turn needs `from` ({', '.join(LLAVA_ROLES)}) and a string `value`")
        role, value = LLAVA_ROLES[turn["from"]], turn["value"]
        if not marks and resolved and role == "user" and not any(m["role"] == "user" for m in out):
            value = LLAVA_IMAGE * len(resolved) + value
        if LLAVA_IMAGE not in value:
            out.append({"role": role, "content": value})
            continue
        content: list[dict[str, Any]] = []
        for k, piece in enumerate(value.split(LLAVA_IMAGE)):
            if k:
                content.append({"type": "image", "image": next(pending)})
            piece = piece.strip()
            if piece:
                content.append({"type": "text", "text": piece})
        out.append({"role": role, "content": content})
    return out


def _resolve_part(part: Any, root: Path) -> Any:
    def resolve(value: Any) -> Any:
        if isinstance(value, str) and not value.startswith("data:") and not Path(value).is_absolute():
            return str(root / value)
        return value

    if isinstance(part, dict):
        for key in ("image", "video", "audio"):
            value = part.get(key)
            if isinstance(value, list):  # a video as its frames
                return {**part, key: [resolve(v) for v in value]}
            if value is not None:
                return {**part, key: resolve(value)}
    return part


_INSTRUCTION = re.compile(r"\s*Answer (with|yes|left)[^.]*\.")


DESCRIPTIVE_TASKS = ("caption", "ocr", "speech_transcribe")


def is_description(record: dict[str, Any]) -> bool:
    """Whether the record's text says what its media holds (a caption, rendered words, a transcript)
    rather than asking about one thing in it: the contrastive text as it is, and tag_loss's target."""
    return record.get("task") in DESCRIPTIVE_TASKS


def pair_text(record: dict[str, Any]) -> str:
    """The text side of a contrastive pair: a caption or transcript as it is, a question with its
    answer otherwise (without the answer-format instruction, which says nothing about the picture)."""
    answer = record["answers"][0]
    if is_description(record):
        return answer
    if record.get("choices"):
        answer = record["choices"]["ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(answer)]
    return f"{_INSTRUCTION.sub('', record['question']).strip()} {answer}"


def hard_negative_captions(record: dict[str, Any], k: int, seed: str) -> list[str | None]:
    """`k` captions of a world caption record's scene, each with one object changed: its shape (most
    often), colour or size. Only the changed object tells one from the true caption, so matching it
    takes seeing every object (NegCLIP-style hard negatives). None for records that are not captions."""
    from tinyomni.world.render import COLORS, SHAPES, SIZES
    from tinyomni.world.skills import caption_text

    objects = (record.get("meta") or {}).get("objects")
    if record.get("task") != "caption" or not objects:
        return [None] * k
    rng = random.Random(seed)
    choices = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}
    ordered = sorted(objects, key=lambda o: o["x"])
    out = []
    for _ in range(k):
        changed = [dict(o) for o in ordered]
        target = rng.choice(changed)
        attribute = rng.choice(["shape", "shape", "shape", "color", "size"])
        target[attribute] = rng.choice([v for v in choices[attribute] if v != target[attribute]])
        out.append(caption_text([(o["size"], o["color"], o["shape"]) for o in changed]))
    return out


def tag_vocabulary(source: RecordSource, tokenizer: Tokenizer, stage: StageSpec, n: int = 512) -> list[int]:
    """The token ids that occur in the descriptive texts among the stage's first `n` samples: what
    tag_loss predicts (CatLIP's fixed vocabulary, taken from the data). Samples are pure functions of
    their index, so every process, and a resumed run, finds the same list."""
    seen: set[int] = set()
    for j in range(n):
        record, _ = source(j)
        if is_description(record):
            seen.update(tokenizer.encode_piece(pair_text(record))[: stage.text_tower.max_length])
    if not seen:
        raise ConfigError(f"stage {stage.name!r}: tag_loss needs descriptive texts (captions, rendered words, "
                          f"transcripts) in its data; the first {n} samples have none")
    return sorted(seen)


def pair_example(tokenizer: Tokenizer, config: Any, stage: StageSpec) -> Callable[[int, dict, Path | None],
                                                                                  PairExample]:
    """Builds PairExamples for `stage.tower`; `config` is the model's OmniConfig."""

    def make(index: int, record: dict[str, Any], root: Path | None) -> PairExample:
        text = pair_text(record)
        ids = tokenizer.encode_piece(text)[: stage.text_tower.max_length]
        negatives = hard_negative_captions(record, stage.hard_negatives,
                                           f"tinyomni-negatives/{stage.data.seed}/{stage.name}/{index}")
        # A record without negatives repeats its own text in those rows; the loss ignores them.
        negative_ids = [tokenizer.encode_piece(t)[: stage.text_tower.max_length] if t is not None else ids
                        for t in negatives]
        if stage.tower == "vision":
            from tinyomni.processing.image import preprocess_image

            image = record.get("image") or (record.get("images") or record.get("video") or [None])[0]
            if image is None:
                raise InputError(f"{record.get('id')}: a vision contrastive stage needs records with an image")
            if root is not None and isinstance(image, str):
                image = str(root / image)
            v = config.vision
            media = preprocess_image(image, image_size=stage.image_size or v.image_size, min_tiles=1, max_tiles=1,
                                     use_thumbnail=False, mean=v.image_mean, std=v.image_std)[0]
        else:
            from tinyomni.processing.audio import load_audio, log_mel_spectrogram

            audio = record.get("audio")
            if audio is None:
                raise InputError(f"{record.get('id')}: an audio contrastive stage needs records with audio")
            if root is not None and isinstance(audio, str):
                audio = str(root / audio)
            media = log_mel_spectrogram(load_audio(audio), n_mels=config.audio.num_mel_bins)
        # A question names one thing, present or not ("Is there a red star? no"), and leaves out the rest
        # of the scene, so only descriptive texts tell tag_loss which words belong to the media.
        return PairExample(index, media, ids, text, negative_ids, negatives, is_description(record))

    return make


# --- batches ---------------------------------------------------------------------------------------

@dataclass
class ChatBatch:
    input_ids: Tensor  # [B, T], right-padded
    labels: Tensor  # [B, T], IGNORE on prompts and padding
    pixel_values: Tensor | None  # every row's tiles, row-major (the order OmniModel fills placeholders)
    audio_features: list[Tensor]
    samples: int
    indices: list[int] = field(default_factory=list)
    qformer_input_ids: list[Tensor] = field(default_factory=list)  # every row's, tile by tile (InstructBLIP)
    image_layouts: list[Layout] = field(default_factory=list)  # every row's, image by image (LLaVA-NeXT)

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is on (labels are predicted from the previous position)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def media_inputs(self) -> dict[str, Any]:
        """OmniModel.embed's (and forward's) media arguments for this batch: what generation passes for the
        same prompts, side inputs included."""
        return {"pixel_values": self.pixel_values, "audio_features": self.audio_features or None,
                "qformer_input_ids": self.qformer_input_ids or None, "image_layouts": self.image_layouts or None}


@dataclass
class PairBatch:
    media: Tensor  # [B, 3, S, S] or [B, n_mels, frames] (right-padded)
    media_mask: Tensor | None  # [B, frames] for audio
    text_ids: Tensor  # [B + B·k, L]: each sample's text, then the k hard negatives of every sample
    text_mask: Tensor  # [B + B·k, L]
    texts: list[str | None]  # one per text row; None marks a negative row that does not count
    samples: int
    indices: list[int] = field(default_factory=list)
    describes: Tensor | None = None  # [B] bool: whose text is a description (tag_loss's targets)


def collate_chat(examples: list[ChatExample], pad_id: int) -> ChatBatch:
    T = max(e.length for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : e.length] = torch.tensor(e.input_ids)
        labels[i, : e.length] = torch.tensor(e.labels)
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    return ChatBatch(ids, labels, stack_tiles(pixels) if pixels else None,
                     [a for e in examples for a in e.audio_features], len(examples), [e.index for e in examples],
                     [torch.tensor(q, dtype=torch.long) for e in examples for q in e.qformer_input_ids],
                     [layout for e in examples for layout in e.image_layouts])


@dataclass
class PreferenceBatch:
    """B preference pairs as one chat batch of 2B rows: the chosen answers, then the rejected ones
    (TRL's layout), so one forward scores both."""

    chat: ChatBatch
    samples: int
    indices: list[int] = field(default_factory=list)

    @property
    def chosen_tokens(self) -> int:
        """Target tokens of the chosen answers (the SFT term's normaliser)."""
        return int((self.chat.labels[: self.samples, 1:] != IGNORE).sum())


def collate_preferences(examples: list[PreferenceExample], pad_id: int) -> PreferenceBatch:
    chat = collate_chat([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
    return PreferenceBatch(chat, len(examples), [e.index for e in examples])


def collate_pairs(examples: list[PairExample], pad_id: int) -> PairBatch:
    rows = [e.text_ids for e in examples] + [ids for e in examples for ids in e.negative_ids]
    texts = [e.text for e in examples] + [t for e in examples for t in e.negatives]
    L = max(len(ids) for ids in rows)
    text = torch.full((len(rows), L), pad_id, dtype=torch.long)
    text_mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, ids in enumerate(rows):
        text[i, : len(ids)] = torch.tensor(ids)
        text_mask[i, : len(ids)] = True
    media_mask = None
    if examples[0].media.dim() == 2:  # audio: right-pad the frames, and say which are real
        frames = max(e.media.shape[-1] for e in examples)
        frames += frames % 2  # the encoder's stride-2 conv wants an even count
        media = torch.zeros(len(examples), examples[0].media.shape[0], frames)
        media_mask = torch.zeros(len(examples), frames, dtype=torch.bool)
        for i, e in enumerate(examples):
            media[i, :, : e.media.shape[-1]] = e.media
            media_mask[i, : e.media.shape[-1]] = True
    else:
        media = torch.stack([e.media for e in examples])
    return PairBatch(media, media_mask, text, text_mask, texts, len(examples), [e.index for e in examples],
                     torch.tensor([e.describes for e in examples]))


class StageBatches(torch.utils.data.IterableDataset):
    """This process's micro-batches of one stage, from `start_step` to the end: for each step, a list
    of micro-batches (gradient accumulation) plus how many samples were dropped as too long."""

    def __init__(self, stage: StageSpec, make: Callable[[int, dict, Path | None], Any], source: RecordSource,
                 pad_id: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0,
                 micro_batch_size: int | None = None) -> None:
        super().__init__()
        if stage.batch_size % world:
            raise InputError(f"stage {stage.name!r}: batch_size {stage.batch_size} must divide among "
                             f"{world} processes")
        self.stage, self.make, self.source, self.pad_id, self.seed = stage, make, source, pad_id, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self.local = stage.batch_size // world
        self.micro = micro_batch_size or self.local
        self.collate = {"contrastive": collate_pairs, "dpo": collate_preferences}.get(stage.kind, collate_chat)
        self._window: tuple[int, list[list[Any]], int] | None = None

    def local_examples(self, step: int) -> tuple[list[Any], int]:
        """This process's examples of a step and the number dropped."""
        M = self.stage.bucket_batches
        w = step // M
        if self._window is None or self._window[0] != w:
            self._window = (w, *self._build_window(w))
        return self._window[1][step % M], self._window[2] if step % M == 0 else 0

    def _build_window(self, w: int) -> tuple[list[list[Any]], int]:
        M, G = self.stage.bucket_batches, self.stage.batch_size
        base = w * M * G
        indices = [base + self.rank + k * self.world for k in range(M * self.local)]
        examples, dropped = [], 0
        for j in indices:
            e = self.make(j, *self.source(j))
            if self.stage.kind in CHAT_KINDS and e.length > self.stage.max_length:
                dropped += 1
                continue
            examples.append(e)
        if M == 1:
            return [examples], dropped
        examples.sort(key=lambda e: (e.length, e.index))
        batches = [examples[i: i + self.local] for i in range(0, len(examples), self.local)]
        batches += [[] for _ in range(M - len(batches))]  # drops could leave a window short
        random.Random(f"tinyomni-train/{self.seed}/{self.stage.name}/{w}").shuffle(batches)
        return batches, dropped

    def step_batches(self, step: int) -> tuple[list[Any], int]:
        examples, dropped = self.local_examples(step)
        micro = [examples[i: i + self.micro] for i in range(0, len(examples), self.micro)]
        return [self.collate(m, self.pad_id) for m in micro if m], dropped

    def __iter__(self) -> Iterator[tuple[list[Any], int]]:
        for step in range(self.start_step, self.stage.steps):
            yield self.step_batches(step)
