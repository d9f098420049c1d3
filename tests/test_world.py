"""The synthetic world: every skill's samples are well formed, deterministic to the byte, split apart
by seed and composition, streamable for training, previewable, and reachable from the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyomni import world
from tinyomni.errors import InputError
from tinyomni.eval.tasks import LETTERS, load_task
from tinyomni.world import cli as world_cli
from tinyomni.world import speech
from tinyomni.world.render import COLORS, SHAPES
from tinyomni.world.splits import HELD_OUT_PAIRS, HELD_OUT_VOICES, HELD_OUT_WORDS, WORDS, pairs

ROOT = Path(__file__).resolve().parent.parent
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_espeak
@pytest.mark.parametrize("skill", list(world.SKILLS))
def test_every_skill_makes_well_formed_samples(skill):
    for split in ("train", "test"):
        for index in range(3):
            s = world.make_sample(skill, index, split)
            assert s.id == f"{skill}-{split}-s0-{index:06d}" and s.skill == skill and s.split == split
            assert s.question and s.answer
            assert s.images or s.video or s.audio is not None
            for image in s.images + (s.video or []):
                assert isinstance(image, Image.Image) and image.mode == "RGB"
            if s.choices:  # multiple choice: the answer is a letter naming one option
                assert s.metric == "multiple_choice" and s.answer in LETTERS[: len(s.choices)]
            if s.candidates:  # a closed answer space holds the answer
                assert s.answer in s.candidates
            if s.audio is not None:
                assert s.audio.dtype == np.int16 and 0.3 < s.audio.size / speech.SAMPLE_RATE < 10


def test_images_have_the_requested_size_and_objects_are_where_meta_says():
    d = world.Difficulty(image_size=256, min_objects=3, max_objects=3)
    s = world.make_sample("color", 0, "train", difficulty=d)
    assert s.images[0].size == (256, 256)
    assert len(s.meta["objects"]) == 3
    pixels = np.asarray(s.images[0]).astype(int)
    for o in s.meta["objects"]:  # the centre pixel of every object has that object's colour
        rgb = pixels[int(o["y"] * 256), int(o["x"] * 256)]
        assert np.abs(rgb - np.array(COLORS[o["color"]])).max() < 40, (o, rgb)


def test_answers_follow_from_the_ground_truth():
    for i in range(10):
        s = world.make_sample("count", i, "train")
        color, shape = s.meta["target"]
        n = sum(1 for o in s.meta["objects"] if (color is None or o["color"] == color)
                and (shape is None or o["shape"] == shape))
        assert s.answer == str(n)
        r = world.make_sample("relation", i, "train")
        a, where, b = r.meta["relation"]
        oa = next(o for o in r.meta["objects"] if f"{o['color']} {o['shape']}" == a)
        ob = next(o for o in r.meta["objects"] if f"{o['color']} {o['shape']}" == b)
        dx, dy = oa["x"] - ob["x"], oa["y"] - ob["y"]
        expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert where == expected and r.choices[LETTERS.index(r.answer)] == where
        e = world.make_sample("exists", i, "train")
        present = {(o["color"], o["shape"]) for o in e.meta["objects"]}
        assert (tuple(e.meta["target"]) in present) == (e.answer == "yes")
        if e.answer == "no" and e.category == "adversarial":  # its colour and its shape are both there
            c, sh = e.meta["target"]
            assert any(o["color"] == c for o in e.meta["objects"])
            assert any(o["shape"] == sh for o in e.meta["objects"])


def test_scene_questions_are_answered_by_the_scene_and_name_only_training_pairs():
    import random
    import re

    from tinyomni.world.skills import COLOR_QUESTIONS, SHAPE_QUESTIONS, scene_questions

    kinds = set()
    for i in range(40):
        s = world.make_sample(["color", "count", "caption", "exists"][i % 4], i, "train")
        objects = s.meta["objects"]
        qas = scene_questions(objects, random.Random(i), "train", 4)
        assert qas == scene_questions(objects, random.Random(i), "train", 4)  # a function of the rng
        assert 1 <= len(qas) <= 4 and len({q for q, _ in qas}) == len(qas)
        for q, a in qas:
            named = [(c, sh) for c in COLORS for sh in SHAPES if re.search(rf"\b{c} {sh}", q)]
            assert all(p in pairs("train") for p in named), q
            asked_shape = [sh for t in COLOR_QUESTIONS for sh in SHAPES if q.startswith(t.format(s=sh))]
            asked_color = [c for t in SHAPE_QUESTIONS for c in COLORS if q.startswith(t.format(c=c))]
            if asked_shape:
                assert [o["color"] for o in objects if o["shape"] == asked_shape[0]] == [a], q
                kinds.add("color")
            elif asked_color:
                assert [o["shape"] for o in objects if o["color"] == asked_color[0]] == [a], q
                kinds.add("shape")
            elif q.startswith("How many"):
                words = q.split("?")[0].split()[2:-2]  # "How many [colour] shapes|objects are there?"
                color = words[0] if words[0] in COLORS else None
                shape = None if words[-1] == "objects" else next(sh for sh in SHAPES if words[-1].startswith(sh))
                n = sum((color is None or o["color"] == color) and (shape is None or o["shape"] == shape)
                        for o in objects)
                assert a == str(n), q
                kinds.add("count")
            else:
                (c, sh), = named
                assert a == ("yes" if any((o["color"], o["shape"]) == (c, sh) for o in objects) else "no"), q
                kinds.add(f"exists-{a}")
    assert kinds == {"color", "shape", "count", "exists-yes", "exists-no"}


def test_pope_style_questions_are_balanced():
    answers = [world.make_sample("exists", i, "train").answer for i in range(200)]
    assert 80 <= answers.count("yes") <= 120


@needs_espeak
def test_same_seed_same_bytes_and_other_seed_other_bytes(tmp_path):
    skills = list(world.SKILLS)
    a = world.write_dataset(tmp_path / "a", skills=skills, n=2, split="train", seed=3)
    b = world.write_dataset(tmp_path / "b", skills=skills, n=2, split="train", seed=3, workers=2)
    c = world.write_dataset(tmp_path / "c", skills=skills, n=2, split="train", seed=4)
    ha, hb, hc = _tree_hash(a.parent), _tree_hash(b.parent), _tree_hash(c.parent)
    assert ha == hb  # identical files, whether made in one process or two
    assert len(ha) > 2 * len(skills)
    different = [k for k in ha if k.endswith(".png") and hc.get(k.replace("-s3-", "-s4-")) != ha[k]]
    assert len(different) > 0.9 * sum(k.endswith(".png") for k in ha)


@needs_espeak
def test_espeak_is_deterministic_and_wav_is_plain():
    one = speech.speak("seven plus five", voice="en-gb", variant="f2", speed=150, pitch=40)
    two = speech.speak("seven plus five", voice="en-gb", variant="f2", speed=150, pitch=40)
    assert np.array_equal(one, two)
    data = speech.wav_bytes(one)
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and len(data) == 44 + 2 * one.size
    assert int.from_bytes(data[24:28], "little") == 16000


def test_missing_espeak_gives_an_install_hint(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    speech.espeak_binary.cache_clear()
    try:
        with pytest.raises(world.MissingDependencyError, match="apt-get install espeak-ng"):
            world.make_sample("speech_math", 0)
    finally:
        speech.espeak_binary.cache_clear()


def test_questions_do_not_depend_on_which_fonts_are_installed(monkeypatch):
    from tinyomni.world import render

    def texts():
        return [(s.question, s.answer) for s in world.generate(["ocr", "document", "chart"], n=6)]

    full = texts()
    only_one = (render.available_fonts()[0],)
    monkeypatch.setattr(render, "available_fonts", lambda: only_one)
    assert texts() == full  # only the pixels of text in a missing font change


def test_missing_fonts_give_a_clear_error(monkeypatch, tmp_path):
    from tinyomni.world import render

    monkeypatch.setattr(render, "FONT_DIRS", (str(tmp_path),))
    render.available_fonts.cache_clear()
    try:
        with pytest.raises(world.MissingDependencyError, match="fonts-dejavu"):
            world.make_sample("ocr", 0)
    finally:
        render.available_fonts.cache_clear()


# --- splits ----------------------------------------------------------------------------------------

def test_held_out_sets_leave_every_part_seen_in_training():
    train = pairs("train")
    assert {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(SHAPES)
    assert not HELD_OUT_PAIRS & set(train)
    assert 0 < len(HELD_OUT_WORDS) < len(WORDS) / 5


def _compositions(s: world.Sample) -> tuple[set, set, set]:
    """Every colour-shape pair, word and voice a sample contains, from its ground truth."""
    objects = list(s.meta.get("objects", [])) + list(s.meta.get("still", []))
    for group in s.meta.get("images", []):
        objects += group
    found = {(o["color"], o["shape"]) for o in objects}
    if "target" in s.meta and None not in s.meta["target"]:
        found.add(tuple(s.meta["target"]))
    keys = ("text", "transcript", "labels", "items", "fields")
    text = " ".join(str(v) for k, v in s.meta.items() if k in keys)
    text += " " + s.answer + " " + s.question
    used_words = {w for w in WORDS if w in text.lower().replace(",", " ").replace("'", " ").split()}
    voices = {(s.meta["voice"], s.meta["variant"])} if "voice" in s.meta else set()
    return found, used_words, voices


@needs_espeak
def test_no_test_composition_appears_in_train_and_test_is_about_them():
    seen_pairs, seen_words, seen_voices = set(), set(), set()
    for s in world.generate(None, n=8, split="train", seed=0):
        p, w, v = _compositions(s)
        seen_pairs |= p
        seen_words |= w
        seen_voices |= v
    assert not seen_pairs & HELD_OUT_PAIRS
    assert not seen_words & HELD_OUT_WORDS
    assert not seen_voices & HELD_OUT_VOICES
    assert len(seen_pairs) > 30 and len(seen_voices) > 10
    about_held_out = 0
    tests = list(world.generate(None, n=4, split="test", seed=0))
    for s in tests:
        p, w, v = _compositions(s)
        about_held_out += bool(p & HELD_OUT_PAIRS or w & HELD_OUT_WORDS or v & HELD_OUT_VOICES)
    assert about_held_out >= 0.85 * len(tests)  # only number/code OCR and receipts' totals may miss


@needs_espeak
def test_splits_and_seeds_never_share_a_sample():
    def fingerprint(s):
        return hashlib.sha256(b"".join(i.tobytes() for i in s.images + (s.video or []))
                              + (s.audio.tobytes() if s.audio is not None else b"")).hexdigest()

    prints = {}
    for split in ("train", "val", "test"):
        for seed in (0, 1):
            samples = world.generate(["color", "ocr", "speech_math"], n=5, split=split, seed=seed)
            prints[(split, seed)] = {fingerprint(s) for s in samples}
    keys = list(prints)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not prints[a] & prints[b], (a, b)


def test_unknown_names_are_input_errors():
    with pytest.raises(InputError, match="unknown skill"):
        world.make_sample("colour", 0)
    with pytest.raises(InputError, match="unknown split"):
        world.make_sample("color", 0, split="dev")
    with pytest.raises(InputError, match="unknown difficulty knob"):
        world.Difficulty().with_overrides({"objects": 3})
    with pytest.raises(InputError, match="noise"):
        world.Difficulty().with_overrides({"noise": 2})


def test_difficulty_knobs_change_samples():
    hard = world.Difficulty(min_objects=7, max_objects=8, noise=0.6, text_length=5, frames=8, frame_size=96)
    s = world.make_sample("shape", 1, difficulty=hard)
    assert len(s.meta["objects"]) >= 7
    assert np.asarray(s.images[0]).std() > np.asarray(world.make_sample("shape", 1).images[0]).std()
    assert len(world.make_sample("video_count", 0, difficulty=hard).video) == 8
    assert world.make_sample("video_count", 0, difficulty=hard).video[0].size == (96, 96)
    per_skill = {"ocr": world.Difficulty(image_size=320)}
    assert world.make_sample("ocr", 0, difficulty=per_skill).images[0].size == (320, 320)
    assert world.make_sample("color", 0, difficulty=per_skill).images[0].size == (224, 224)


# --- records, files, stream ------------------------------------------------------------------------

@needs_espeak
def test_written_records_are_task_files_and_llava_conversations(tmp_path):
    path = world.write_dataset(tmp_path, skills="relation,multi_same,video_order,speech_vqa", n=2,
                               split="val")
    items = load_task(path)
    records = world.read_records(path)
    assert len(items) == 8 and json.loads((tmp_path / "val.json").read_text())["n_per_skill"] == 2
    for record, item in zip(records, items):
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": record["answers"][0]}
        assert human["value"].count("<image>") == len(item.images)
        assert ("<video>" in human["value"]) == (item.video is not None)
        assert ("<audio>" in human["value"]) == (item.audio is not None)
        assert all(Path(p).is_file() for p in item.images + (item.video or []) + [item.audio or path])
    mc = next(i for i in items if i.task == "relation")
    assert mc.choices and "A. " in records[0]["conversations"][0]["value"]
    msgs = world.messages(records[-1], root=tmp_path)
    kinds = [p["type"] for p in msgs[0]["content"]]
    assert kinds == ["image", "audio", "text"] and msgs[1]["role"] == "assistant"
    assert Path(msgs[0]["content"][0]["image"]).is_file()


@needs_espeak
def test_stream_yields_in_memory_records_like_the_files(tmp_path):
    stream = world.WorldStream(skills=["color", "speech_math"], split="train", seed=0, limit=4)
    records = list(stream)
    assert [r["task"] for r in records] == ["color", "speech_math", "color", "speech_math"]
    assert [r["id"][-1] for r in records] == ["0", "0", "1", "1"]
    assert isinstance(records[0]["image"], Image.Image) and records[1]["audio"][:4] == b"RIFF"
    written = world.read_records(world.write_dataset(tmp_path, skills=["color", "speech_math"], n=2))
    by_id = {r["id"]: r for r in written}
    for r in records:  # same sample, same text fields, same media bytes
        w = by_id[r["id"]]
        assert r["conversations"] == w["conversations"] and r["answers"] == w["answers"]
        if "audio" in r:
            assert r["audio"] == (tmp_path / w["audio"]).read_bytes()
    msgs = world.messages(records[1])
    assert msgs[0]["content"][0] == {"type": "audio", "audio": records[1]["audio"]}


def test_stream_shards_and_workers_split_the_indices_without_overlap():
    everything = [r["id"] for r in world.WorldStream(skills=["color", "color", "shape"], limit=12)]
    assert len(set(everything)) == 12  # a skill listed twice gets twice the samples, never a repeat
    assert sum("color" in i for i in everything) == 8
    shards = [[r["id"] for r in world.WorldStream(skills=["color", "color", "shape"], limit=12, shard=k,
                                                   num_shards=2)] for k in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(everything)
    loader = torch.utils.data.DataLoader(world.WorldStream(skills="color,shape", limit=6), batch_size=None,
                                         num_workers=2, collate_fn=lambda r: r["id"])
    assert sorted(loader) == sorted(r["id"] for r in world.WorldStream(skills="color,shape", limit=6))


# --- preview and CLI -------------------------------------------------------------------------------

@needs_espeak
def test_preview_sheet_shows_every_skill(tmp_path):
    samples = list(world.generate(None, n=1, split="train", seed=0))
    path = world.write_preview(samples, tmp_path / "preview.png")
    sheet = Image.open(path)
    rows = -(-len(samples) // 4)
    assert sheet.size == (4 * 226, rows * 354)
    cells = np.asarray(sheet.convert("L"))
    for k in range(len(samples)):  # each cell's media area has content (not blank)
        x, y = (k % 4) * 226 + 8, (k // 4) * 354 + 8
        assert cells[y:y + 210, x:x + 210].std() > 5
    html = world.write_preview(samples[:3], tmp_path / "preview.html").read_text()
    assert html.count("<img") == 3 and "A: " in html
    # docs/world_preview.png is the copy a person looked at; TINYOMNI_UPDATE_DOCS=1 refreshes it.
    docs = ROOT / "docs" / "world_preview.png"
    if not docs.exists() or os.environ.get("TINYOMNI_UPDATE_DOCS") == "1":
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, docs)
    assert path.stat().st_size < 500_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyomni")
    world_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


@needs_espeak
def test_preview_of_an_eval_shows_the_scored_samples_with_the_model_answers(tmp_path):
    from tinyomni.world.cli import predicted_samples

    rows = [{"id": s.id, "prediction": p, "score": float(p == s.answer)}
            for s, p in zip(world.generate(["color", "count"], n=3, split="test", seed=0),
                            ["red", "blue", "green", "3", "0", "1"])]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, said = predicted_samples(str(path), n=2)
    assert [s.id for s in samples] == [rows[k]["id"] for k in (0, 1, 3, 4)]
    assert said[0] == ("red", rows[0]["score"] == 1.0)
    assert samples[2].answer == world.make_sample("count", 0, "test", 0).answer
    sheet = world.contact_sheet(samples, predictions=said)
    assert sheet.size == (4 * 226, 354)
    with pytest.raises(InputError, match="give a .png path"):  # the HTML page has no answers to show
        world.write_preview(samples, tmp_path / "preview.html", predictions=said)
    path.write_text(json.dumps({"id": "my-own-item", "prediction": "x"}) + "\n")
    with pytest.raises(InputError, match="not the id of a world sample"):
        predicted_samples(str(path), n=1)


def test_cli_generate_preview_bench_and_skills(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["world", "generate", "--out", str(tmp_path / "d"), "--skills", "count,ocr",
                              "--n", "3",
                              "--split", "val", "--max-objects", "3", "--noise", "0.1"])
    assert args.func(args) == 0
    records = world.read_records(tmp_path / "d" / "val.jsonl")
    assert len(records) == 6 and all(r["split"] == "val" for r in records)
    manifest = json.loads((tmp_path / "d" / "val.json").read_text())
    assert manifest["difficulty"]["max_objects"] == 3 and manifest["difficulty"]["noise"] == 0.1

    knobs = tmp_path / "knobs.json"
    knobs.write_text(json.dumps({"*": {"image_size": 128}, "ocr": {"image_size": 160}}))
    args = parser.parse_args(["world", "preview", "--out", str(tmp_path / "p.png"), "--skills", "color,ocr",
                              "--difficulty", str(knobs)])
    assert args.func(args) == 0 and (tmp_path / "p.png").stat().st_size > 1000
    spec = world_cli.difficulty_from_args(args)
    assert spec["ocr"].image_size == 160 and spec["*"].image_size == 128

    args = parser.parse_args(["world", "bench", "--out", str(tmp_path / "b"), "--n", "1"])
    assert args.func(args) == 0
    bench = load_task(tmp_path / "b" / "world-bench.jsonl")
    assert {i.task for i in bench} == set(world.SKILLS) and all("-test-" in i.id for i in bench)

    args = parser.parse_args(["world", "skills"])
    assert args.func(args) == 0
    assert "speech_math" in capsys.readouterr().out
