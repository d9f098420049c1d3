"""Task files: JSONL, one item per line, and how an item becomes chat messages.

An item line looks like

    {"id": "q1", "question": "What color is the star?", "answers": ["red"], "metric": "exact_match",
     "image": "media/q1.png"}

Fields: `question` and `answers` (or a single `answer`) are required. Optional: `id` (default
"<file stem>-<line>"), `metric` (default exact_match; see tinyomni.eval.metrics.METRICS), `task` (the
group it is scored in; default the file stem), `choices` (multiple-choice options, shown as "A. ...";
then answers hold letters), `candidates` (a closed answer space, never shown: for chance and the
random baseline), `category` and `group` (MME / POPE sub-groups), `system` (a system prompt), and
media: `image` (a path or a list), `images`, `video` (a video file or a list of frame paths), `audio`.
Media paths are relative to the task file. The world writes the same fields (plus LLaVA-style
`conversations`), so its files are task files as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinyomni.errors import InputError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class Item:
    """One question to score. Media are paths (resolved) or in-memory objects (PIL images, bytes)."""

    id: str
    question: str
    answers: list[str]
    metric: str = "exact_match"
    task: str = "task"
    images: list[Any] = field(default_factory=list)
    video: Any = None  # a video path, or a list of frames
    audio: Any = None
    choices: list[str] | None = None
    candidates: list[str] | None = None
    category: str | None = None
    group: str | None = None
    system: str | None = None
    circular_of: str | None = None  # set on the rotated copies made for circular evaluation


def prompt_text(question: str, choices: list[str] | None = None) -> str:
    """The text the model sees: the question, then lettered options for a multiple choice."""
    if not choices:
        return question
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{MC_INSTRUCTION}"


def item_messages(item: Item, answer: str | None = None) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for an item: media first, then the text; optionally the answer turn."""
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in item.images]
    if item.video is not None:
        content.append({"type": "video", "video": item.video})
    if item.audio is not None:
        content.append({"type": "audio", "audio": item.audio})
    content.append({"type": "text", "text": prompt_text(item.question, item.choices)})
    messages: list[dict[str, Any]] = []
    if item.system:
        messages.append({"role": "system", "content": item.system})
    messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def circular_variants(item: Item) -> list[Item]:
    """MMBench circular evaluation: the item with its options rotated once per option. A model
    scores the item only if it answers every rotation correctly."""
    if not item.choices:
        return [item]
    n = len(item.choices)
    correct = item.choices[LETTERS.index(item.answers[0])]
    variants = []
    for shift in range(n):
        choices = item.choices[shift:] + item.choices[:shift]
        variants.append(replace(item, id=f"{item.id}@{shift}", choices=choices,
                                answers=[LETTERS[choices.index(correct)]], circular_of=item.id))
    return variants


# --- loading ---------------------------------------------------------------------------------------

def load_task(path: str | Path, task: str | None = None) -> list[Item]:
    """Read a task JSONL file into items, checking every line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task file not found: {path}")
    name = task or path.stem
    items: list[Item] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            item = item_from_record(record, root=path.parent, default_id=f"{name}-{lineno}",
                                    default_task=name, where=where)
            if item.id in seen:
                raise InputError(f"{where}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise InputError(f"task file {path} has no items")
    return items


def item_from_record(record: dict[str, Any], root: Path | None = None, default_id: str = "item",
                     default_task: str = "task", where: str = "record") -> Item:
    """Build an Item from a task-file record (a dict). Paths are resolved against `root`."""
    from tinyomni.eval.metrics import METRICS  # metrics imports nothing from here; keep load order simple

    if not isinstance(record, dict):
        raise InputError(f"{where}: each line must be a JSON object")
    question = record.get("question")
    if not isinstance(question, str):
        raise InputError(f"{where}: needs a string 'question'")
    answers = record.get("answers", record.get("answer"))
    if isinstance(answers, (str, int, float)):
        answers = [str(answers)]
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{where}: needs 'answers' (a non-empty list) or 'answer'")
    answers = [str(a) for a in answers]
    metric = record.get("metric", "exact_match")
    if metric not in METRICS:
        raise InputError(f"{where}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise InputError(f"{where}: 'choices' must be a list of 2 to 26 options")
        choices = [str(c) for c in choices]
        letters = LETTERS[: len(choices)]
        for a in answers:
            if a not in letters:
                raise InputError(f"{where}: with 'choices', answers must be option letters ({letters}), "
                                 f"got {a!r}")
    elif metric == "multiple_choice":
        raise InputError(f"{where}: metric multiple_choice needs 'choices'")

    def resolve(value: Any) -> Any:
        is_url = isinstance(value, str) and value.startswith(("data:", "http://", "https://"))
        if isinstance(value, str) and root is not None and not is_url:
            p = Path(value)
            p = p if p.is_absolute() else root / p
            if not p.exists():
                raise InputError(f"{where}: media file not found: {p}")
            return str(p)
        return value

    images = record.get("images", record.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    video = record.get("video")
    video = [resolve(v) for v in video] if isinstance(video, list) else resolve(video)
    return Item(
        id=str(record.get("id", default_id)),
        question=question,
        answers=answers,
        metric=metric,
        task=str(record.get("task", default_task)),
        images=[resolve(i) for i in images],
        video=video,
        audio=resolve(record.get("audio")),
        choices=choices,
        candidates=record.get("candidates"),
        category=record.get("category"),
        group=None if record.get("group") is None else str(record["group"]),
        system=record.get("system"),
    )


# --- world-retrieval: image ↔ caption pairs for dual encoders ----------------------------------------
WORLD_RETRIEVAL = "world-retrieval"
RETRIEVAL_N, RETRIEVAL_SEED = 500, 0  # fixed forever, like world-bench, so scores stay comparable


@dataclass
class RetrievalPair:
    """One image and its caption; a retrieval task is a list of them (every other caption a negative)."""

    id: str
    image: Any  # a path or an in-memory image
    text: str


def world_retrieval_pairs(n: int = RETRIEVAL_N, seed: int = RETRIEVAL_SEED, split: str = "test",
                          image_size: int | None = None) -> list[RetrievalPair]:
    """The world's held-out caption samples (split "test": every scene holds one of the colour-shape
    pairs training never saw) as image ↔ caption pairs, made in memory. The captions are the world's
    own ("A large red star and a small blue circle."), left to right, with sizes."""
    from tinyomni.world.generator import generate

    if n < 2:
        raise InputError(f"world-retrieval needs at least 2 pairs, got {n}")
    difficulty = None if image_size is None else {"image_size": image_size}
    return [RetrievalPair(s.id, s.images[0], s.answer)
            for s in generate(["caption"], n=n, split=split, seed=seed, difficulty=difficulty)]
