"""Converters from standard benchmarks' published file formats to task files (JSONL).

Bring the benchmark's files (nothing is downloaded), convert once, then run it like any task:

    tinyomni eval convert pope coco_pope_random.json --images val2014/ -o pope_random.jsonl
    tinyomni eval run pope_random.jsonl --model smollm2

Each converter reads the format as its authors publish it and returns task records; `FORMATS` maps
the names the CLI accepts to them.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyomni.errors import InputError

Record = dict[str, Any]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def _need(images: Path | None, name: str) -> Path:
    if images is None:
        raise InputError(f"format {name} needs --images (the folder with the benchmark's images)")
    return images


def pope(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """POPE (RUCAIBox/POPE): JSON lines {question_id, image, text, label}; the setting (random /
    popular / adversarial) is taken from the file name."""
    images = _need(images, "pope")
    category = next((c for c in ("adversarial", "popular", "random") if c in source.name), None)
    records = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            records.append({"id": f"pope-{category or 'x'}-{q['question_id']}", "question": q["text"],
                            "answers": [q["label"]], "metric": "pope", "image": str(images / q["image"]),
                            "candidates": ["yes", "no"], **({"category": category} if category else {})})
    return records


def mme(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """MME (MME_Benchmark_release_version/): one folder per category; per image a .txt of
    "question<TAB>answer" lines, beside the image or in questions_answers_YN/ next to images/.
    Files of "image<TAB>question<TAB>answer[<TAB>...]" lines (the eval tool's layout) work too."""
    records = []
    for txt in sorted(source.rglob("*.txt")):
        category = txt.relative_to(source).parts[0] if txt.parent != source else txt.stem
        for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
            cols = [c.strip() for c in line.split("\t")]
            if len(cols) < 2 or not cols[0]:
                continue
            if len(cols) >= 3:
                image_name, question, answer = cols[0], cols[1], cols[2]
                folder = txt.parent / category if (txt.parent / category).is_dir() else txt.parent
                image = _find_image(folder, Path(image_name).stem, images)
            else:
                question, answer = cols
                in_qa_folder = txt.parent.name == "questions_answers_YN"
                folder = txt.parent.parent / "images" if in_qa_folder else txt.parent
                image_name = txt.stem
                image = _find_image(folder, txt.stem, images)
            records.append({"id": f"mme-{category}-{Path(image_name).stem}-{n}", "question": question,
                            "answers": [answer.lower()], "metric": "mme", "image": str(image),
                            "category": category, "group": f"{category}/{Path(image_name).stem}",
                            "candidates": ["yes", "no"]})
    if not records:
        raise InputError(f"no MME question files (*.txt) under {source}")
    return records


def _find_image(folder: Path, stem: str, fallback: Path | None) -> Path:
    for d in (folder, fallback) if fallback else (folder,):
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
            if (d / (stem + ext)).exists():
                return d / (stem + ext)
    raise InputError(f"no image {stem}.jpg/.png in {folder}")


def mmbench(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """MMBench TSV (index, question, hint, A, B, C, D, answer, category, image as base64, ...).
    Images are decoded into <out_dir>/media/<tsv name>/. Run with --circular for the official score."""
    csv.field_size_limit(sys.maxsize)
    media = out_dir / "media" / source.stem
    media.mkdir(parents=True, exist_ok=True)
    records = []
    with source.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            choices = [row[k] for k in "ABCDEFGHI" if k in row and row[k] not in ("", "nan", None)]
            hint = row.get("hint") or ""
            question = row["question"] if hint in ("", "nan") else f"{hint}\n{row['question']}"
            data = base64.b64decode(row["image"])
            image = media / (row["index"] + (".jpg" if data[:2] == b"\xff\xd8" else ".png"))
            image.write_bytes(data)
            record = {"id": f"mmbench-{row['index']}", "question": question, "choices": choices,
                      "metric": "multiple_choice", "image": str(image), "category": row.get("category")}
            if row.get("answer") in ("", None, "nan"):
                raise InputError(f"{source}: row {row['index']} has no answer (a test split without labels?)")
            record["answers"] = [row["answer"].strip()]
            records.append(record)
    return records


def vqav2(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """VQAv2: the questions JSON (v2_OpenEnded_mscoco_<split>_questions.json) with the annotations
    JSON beside it (v2_mscoco_<split>_annotations.json); images COCO_<split>_<id:012d>.jpg."""
    images = _need(images, "vqav2")
    questions = _json(source)
    split = questions.get("data_subtype", "val2014")
    annotations_path = source.parent / f"v2_mscoco_{split}_annotations.json"
    annotations = {a["question_id"]: a for a in _json(annotations_path)["annotations"]}
    return [{"id": f"vqav2-{q['question_id']}", "question": q["question"],
             "answers": [a["answer"] for a in annotations[q["question_id"]]["answers"]], "metric": "vqa",
             "image": str(images / f"COCO_{split}_{q['image_id']:012d}.jpg"),
             "category": annotations[q["question_id"]].get("answer_type")}
            for q in questions["questions"]]


def textvqa(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """TextVQA (TextVQA_0.5.1_val.json): {"data": [{question_id, question, image_id, answers}]}."""
    images = _need(images, "textvqa")
    return [{"id": f"textvqa-{q['question_id']}", "question": q["question"], "answers": q["answers"],
             "metric": "vqa", "image": str(images / f"{q['image_id']}.jpg")} for q in _json(source)["data"]]


def docvqa(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """DocVQA (val_v1.0.json): {"data": [{questionId, question, image: "documents/x.png", answers}]};
    --images is the folder the image paths are relative to (default: the JSON's folder)."""
    root = images or source.parent
    return [{"id": f"docvqa-{q['questionId']}", "question": q["question"], "answers": q["answers"],
             "metric": "anls", "image": str(root / q["image"])} for q in _json(source)["data"]]


def chartqa(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """ChartQA (test_human.json / test_augmented.json): [{imgname, query, label}], images in png/."""
    root = images or source.parent / "png"
    return [{"id": f"chartqa-{source.stem}-{i}", "question": q["query"], "answers": [str(q["label"])],
             "metric": "relaxed", "image": str(root / q["imgname"])} for i, q in enumerate(_json(source))]


def librispeech(source: Path, images: Path | None, out_dir: Path) -> list[Record]:
    """LibriSpeech (e.g. test-clean/): <speaker>/<chapter>/*.trans.txt lines "ID TRANSCRIPT", ID.flac."""
    records = []
    for trans in sorted(source.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if line.strip():
                uid, text = line.split(" ", 1)
                records.append({"id": f"librispeech-{uid}", "question": "Transcribe the audio.",
                                "answers": [text.lower()], "metric": "wer",
                                "audio": str(trans.parent / f"{uid}.flac")})
    if not records:
        raise InputError(f"no *.trans.txt under {source}")
    return records


FORMATS: dict[str, Callable[[Path, Path | None, Path], list[Record]]] = {
    "pope": pope, "mme": mme, "mmbench": mmbench, "vqav2": vqav2, "textvqa": textvqa, "docvqa": docvqa,
    "chartqa": chartqa, "librispeech": librispeech,
}


def convert(fmt: str, source: str | Path, out: str | Path, images: str | Path | None = None) -> Path:
    """Convert a benchmark file/folder to a task JSONL at `out`; media paths are written relative to it."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise InputError(f"not found: {source}")
    out.parent.mkdir(parents=True, exist_ok=True)
    records = FORMATS[fmt](source, Path(images) if images else None, out.parent)
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            for key in ("image", "audio"):
                if key in r:
                    r[key] = os.path.relpath(r[key], out.parent)
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")
    return out
