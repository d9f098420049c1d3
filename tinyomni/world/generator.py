"""Making samples: one by index, many in order, or an endless stream for training.

`make_sample(skill, index, split, seed)` is the only place a skill is called: every other entry point
(the writers, the stream, the preview, the bench) goes through it, so a sample is the same bytes
whichever way it was made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tinyomni.errors import InputError
from tinyomni.eval.tasks import item_from_record, item_messages, prompt_text
from tinyomni.world.sample import Difficulty, Sample
from tinyomni.world.skills import SKILLS
from tinyomni.world.speech import wav_bytes
from tinyomni.world.splits import check_split, sample_rng

DifficultySpec = Difficulty | dict[str, Difficulty] | None


def resolve_skills(skills: Sequence[str] | str | None) -> list[str]:
    """Skill names in SKILLS order; None or "all" means every skill. Unknown names are an error."""
    if skills is None or skills == "all":
        return list(SKILLS)
    if isinstance(skills, str):
        skills = [s.strip() for s in skills.split(",") if s.strip()]
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise InputError(f"unknown skill(s): {', '.join(unknown)}; known: {', '.join(SKILLS)}")
    return list(dict.fromkeys(skills))


def difficulty_for(skill: str, difficulty: DifficultySpec) -> Difficulty:
    """A single Difficulty for all skills, or a dict of per-skill ones ("*" = the default)."""
    if difficulty is None:
        return Difficulty()
    if isinstance(difficulty, Difficulty):
        return difficulty
    return difficulty.get(skill) or difficulty.get("*") or Difficulty()


def make_sample(skill: str, index: int, split: str = "train", seed: int = 0,
                difficulty: DifficultySpec = None) -> Sample:
    """Sample number `index` of a skill: a pure function of its arguments."""
    check_split(split)
    if skill not in SKILLS:
        raise InputError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    d = difficulty_for(skill, difficulty)
    d.validate()
    sample = SKILLS[skill](sample_rng(seed, split, skill, index), split, d)
    sample.id = sample_id(skill, index, split, seed)
    sample.skill, sample.split = skill, split
    return sample


def sample_id(skill: str, index: int, split: str, seed: int) -> str:
    return f"{skill}-{split}-s{seed}-{index:06d}"


def parse_sample_id(text: str) -> tuple[str, int, str, int]:
    """(skill, index, split, seed) of a sample id, so a scored sample can be made again; InputError if
    it is not a world sample's id."""
    try:
        skill, split, seed, index = text.rsplit("-", 3)
        parsed = skill, int(index), split, int(seed.removeprefix("s"))
    except ValueError:
        parsed = None
    if parsed is None or sample_id(*parsed) != text or skill not in SKILLS:
        raise InputError(f"{text!r} is not the id of a world sample")
    return parsed


def generate(skills: Sequence[str] | str | None = None, n: int = 10, split: str = "train", seed: int = 0,
             difficulty: DifficultySpec = None, start: int = 0) -> Iterator[Sample]:
    """`n` samples per skill (indices start..start+n-1), skill by skill."""
    for skill in resolve_skills(skills):
        for index in range(start, start + n):
            yield make_sample(skill, index, split, seed, difficulty)


# --- records: the JSONL line of a sample -----------------------------------------------------------

def to_record(sample: Sample, images: list[Any] | None = None, video: list[Any] | None = None,
              audio: Any = None) -> dict[str, Any]:
    """The task-file / LLaVA-style record of a sample.

    Media values are what the caller passes (relative paths when writing files); left as None they
    are the in-memory media: PIL images, a list of PIL frames, WAV bytes.
    """
    if images is None:
        images = list(sample.images)
    if video is None and sample.video is not None:
        video = list(sample.video)
    if audio is None and sample.audio is not None:
        audio = wav_bytes(sample.audio)
    record: dict[str, Any] = {
        "id": sample.id, "task": sample.skill, "split": sample.split,
        "question": sample.question, "answers": [sample.answer, *sample.answers], "metric": sample.metric,
    }
    for key in ("choices", "candidates", "category"):
        if getattr(sample, key) is not None:
            record[key] = getattr(sample, key)
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["images"] = images
    if video is not None:
        record["video"] = video
    if audio is not None:
        record["audio"] = audio
    # LLaVA-style conversation: one placeholder per medium, in the order item_messages sends them.
    tags = "<image>\n" * len(images) + ("<video>\n" if video is not None else "") + \
        ("<audio>\n" if audio is not None else "")
    record["conversations"] = [
        {"from": "human", "value": tags + prompt_text(sample.question, sample.choices)},
        {"from": "gpt", "value": sample.answer},
    ]
    record["meta"] = sample.meta
    return record


class WorldStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of records with in-memory media, for training.

    Skills take turns (optionally weighted by repeating names). Under a torch DataLoader with several
    workers, and across `num_shards` (e.g. distributed ranks), each sample index goes to exactly one
    consumer, so nothing is duplicated. Records are those of `to_record`; `messages(record)` turns one
    into chat messages with the assistant answer.
    """

    def __init__(self, skills: Sequence[str] | str | None = None, split: str = "train", seed: int = 0,
                 difficulty: DifficultySpec = None, start: int = 0, limit: int | None = None,
                 shard: int = 0, num_shards: int = 1):
        super().__init__()
        check_split(split)
        if not 0 <= shard < num_shards:
            raise InputError(f"shard must be in 0..{num_shards - 1}, got {shard}")
        # A list may repeat names to weight skills; a string or None goes through resolve_skills.
        self.skills = list(skills) if isinstance(skills, (list, tuple)) else resolve_skills(skills)
        resolve_skills(self.skills)  # only to reject unknown names
        self.split, self.seed, self.difficulty = split, seed, difficulty
        self.start, self.limit, self.shard, self.num_shards = start, limit, shard, num_shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stride = self.num_shards * workers
        offset = self.shard * workers + worker
        k = len(self.skills)
        # Slot p of the cycle holds a skill; `rank[p]` says which of that skill's slots it is, so a
        # skill listed m times gets indices round*m + rank and never repeats one.
        rank = [self.skills[:p].count(s) for p, s in enumerate(self.skills)]
        times = [self.skills.count(s) for s in self.skills]
        j = self.start + offset
        while self.limit is None or j < self.start + self.limit:
            p = j % k
            skill, index = self.skills[p], (j // k) * times[p] + rank[p]
            yield to_record(make_sample(skill, index, self.split, self.seed, self.difficulty))
            j += stride


def messages(record: dict[str, Any], with_answer: bool = True,
             root: str | Path | None = None) -> list[dict[str, Any]]:
    """Chat messages (tinyomni/OpenAI style) for a world record: in memory from WorldStream, or a JSONL
    line (then pass `root`, the JSONL's folder, so media paths resolve)."""
    where = str(record.get("id", "record"))
    item = item_from_record(record, root=None if root is None else Path(root), where=where)
    return item_messages(item, answer=record["answers"][0] if with_answer else None)
