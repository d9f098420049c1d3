"""Writing samples to disk: a JSONL file of records plus a media folder, byte for byte reproducible.

Layout of `out/`:

    <name>.jsonl              one record per line (task-file fields + LLaVA `conversations` + `meta`)
    <name>.json               how it was made (skills, split, seed, n, difficulty), to regenerate it
    media/<skill>/<id>.png    images (<id>_1.png ... for several), <id>_f00.png ... for video frames,
                              <id>.wav for audio (16 kHz mono PCM16)

Media paths in records are relative to `out/`. PNGs carry no metadata and WAVs have the plain
44-byte header, so the same seed and options always give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tinyomni.world.generator import DifficultySpec, make_sample, resolve_skills, to_record
from tinyomni.world.render import FONT_FILES, available_fonts, png_bytes
from tinyomni.world.sample import Difficulty, Sample
from tinyomni.world.speech import wav_bytes


def write_sample(sample: Sample, out: Path) -> dict[str, Any]:
    """Write a sample's media under out/media/<skill>/ and return its record (with relative paths)."""
    folder = out / "media" / sample.skill
    folder.mkdir(parents=True, exist_ok=True)
    rel = f"media/{sample.skill}/{sample.id}"
    images = []
    for i, image in enumerate(sample.images):
        name = f"{rel}.png" if len(sample.images) == 1 else f"{rel}_{i + 1}.png"
        (out / name).write_bytes(png_bytes(image))
        images.append(name)
    video = None
    if sample.video is not None:
        video = []
        for i, frame in enumerate(sample.video):
            name = f"{rel}_f{i:02d}.png"
            (out / name).write_bytes(png_bytes(frame))
            video.append(name)
    audio = None
    if sample.audio is not None:
        audio = f"{rel}.wav"
        (out / audio).write_bytes(wav_bytes(sample.audio))
    return to_record(sample, images=images, video=video, audio=audio)


def _make_and_write(job: tuple[str, int, str, int, DifficultySpec, str]) -> str:
    skill, index, split, seed, difficulty, out = job
    return json.dumps(write_sample(make_sample(skill, index, split, seed, difficulty), Path(out)),
                      ensure_ascii=False)


def write_dataset(out: str | Path, skills: Sequence[str] | str | None = None, n: int = 100,
                  split: str = "train",
                  seed: int = 0, difficulty: DifficultySpec = None, name: str | None = None, workers: int = 1,
                  progress: bool = False) -> Path:
    """Generate `n` samples per skill and write <out>/<name>.jsonl (name defaults to the split).

    `workers` > 1 renders in parallel processes; the output is identical to workers=1.
    Returns the JSONL path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = resolve_skills(skills)
    name = name or split
    jobs = [(skill, i, split, seed, difficulty, str(out)) for skill in names for i in range(n)]
    jsonl = out / f"{name}.jsonl"
    manifest = {
        "generator": "tinyomni.world/v1", "split": split, "seed": seed, "n_per_skill": n, "skills": names,
        "difficulty": _difficulty_json(difficulty),
        # Text pixels depend on these; a font missing here was drawn with a stand-in.
        "fonts_missing": [f for f in FONT_FILES if f not in {p.name for p in available_fonts()}],
    }
    (out / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with jsonl.open("w", encoding="utf-8") as f, _progress(progress) as bar:
        task = bar.add_task(f"world {split}", total=len(jobs))
        lines: Iterable[str]
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers)
            lines = pool.map(_make_and_write, jobs, chunksize=8)
        else:
            pool, lines = None, map(_make_and_write, jobs)
        try:
            for line in lines:  # map keeps job order, so the file is the same for any worker count
                f.write(line + "\n")
                bar.advance(task)
        finally:
            if pool is not None:
                pool.shutdown()
    return jsonl


def read_records(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _difficulty_json(difficulty: DifficultySpec) -> Any:
    if difficulty is None:
        return dataclasses.asdict(Difficulty())
    if isinstance(difficulty, Difficulty):
        return dataclasses.asdict(difficulty)
    return {k: dataclasses.asdict(v) for k, v in difficulty.items()}


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    disable=not enabled, transient=False)
