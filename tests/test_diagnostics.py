"""The diagnostic scripts the model card quotes: they must count what they say they count."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    if str(ROOT / "diagnostics") not in sys.path:
        sys.path.insert(0, str(ROOT / "diagnostics"))  # scripts import each other's helpers
    spec = importlib.util.spec_from_file_location(name, ROOT / "diagnostics" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_binding_questions_name_one_object_and_answer_with_its_attribute():
    text_binding = script("text_binding")
    for asked in ("color", "shape"):
        questions = text_binding.scenes(50, seed=0, asked=asked)
        assert len(questions) == 50
        for question, answer, chance in questions:
            scene, ask = re.match(r"The image shows (.*)\. What (?:color|shape) is the (.*?)\?", question).groups()
            objects = [o.split() for o in re.split(r", | and ", scene)]  # ["a", colour, shape]
            assert 2 <= len(objects) <= 5
            named = [o for o in objects if (o[2] if asked == "color" else o[1]) == ask.removesuffix(" object")]
            assert len(named) == 1  # "the star" is one object
            assert answer == (named[0][1] if asked == "color" else named[0][2])
            assert chance == 1 / len({o[1] if asked == "color" else o[2] for o in objects})
    assert text_binding.first_word_of("The star is a Red star.", ["red", "blue"]) == "red"
    assert text_binding.first_word_of("I cannot tell.", ["red"]) is None


def test_binding_errors_tells_unbound_answers_from_unseen_ones(tmp_path):
    objects = [{"shape": "star", "color": "red"}, {"shape": "circle", "color": "blue"}]
    records = [{"id": f"c{i}", "task": "color", "meta": {"objects": objects}} for i in range(4)]
    predictions = [  # right, wrong but in the picture (twice), wrong and not in the picture
        {"id": "c0", "task": "color", "prediction": "red", "score": 1.0},
        {"id": "c1", "task": "color", "prediction": "blue", "score": 0.0},
        {"id": "c2", "task": "color", "prediction": "Blue", "score": 0.0},
        {"id": "c3", "task": "color", "prediction": "green", "score": 0.0},
    ]
    for name, rows in (("records.jsonl", records), ("predictions.jsonl", predictions)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "diagnostics" / "binding_errors.py"),
                          str(tmp_path / "predictions.jsonl"), str(tmp_path / "records.jsonl")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if " color " in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["color", "4", "25", "50", "25", "50.0"]


def test_text_binding_training_records_follow_the_replay_and_answer_from_their_scene(tmp_path):
    text_binding = script("text_binding")
    replay = tmp_path / "replay.jsonl"
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    replay.write_text(json.dumps({"id": "replay-0000", "messages": hello}) + "\n")
    records = text_binding.training_records(replay, 30)
    assert len(records) == 31 and records[0]["id"] == "replay-0000"
    checked = 0
    color_question = r"What (?:color is|is the color of) the (\w+)\?|Which color does the (\w+) have\?"
    for record in records[1:]:
        first = record["messages"][0]["content"]
        scene = re.match(r"In a picture there are (.*?)\. ", first).group(1)
        objects = [o.split()[1:] for o in re.split(r", | and ", scene)]  # [colour, shape]
        for question, answer in zip(record["messages"][::2], record["messages"][1::2]):
            asked = re.search(color_question, question["content"])
            if asked:
                shape = next(g for g in asked.groups() if g)
                assert [c for c, s in objects if s == shape] == [answer["content"]]
                checked += 1
    assert checked > 5


def test_word_tokens_writes_each_object_as_its_words_where_the_script_says():
    import torch

    word_tokens = script("word_tokens")
    word = {w: torch.full((4,), float(i + 1)) for i, w in enumerate(["red", "star", "blue", "circle"])}
    tokens = torch.zeros(1, 25, 4)
    objects = [{"color": "red", "shape": "star", "x": 0.1, "y": 0.1},  # grid cell (0, 0)
               {"color": "blue", "shape": "circle", "x": 0.99, "y": 0.5}]  # cell (2, 4)
    assert word_tokens.replace_tokens(tokens, objects, "picture", word) is tokens
    centre = word_tokens.replace_tokens(tokens, objects, "centre", word)
    assert centre[0, 0].tolist() == [3.0] * 4 and centre[0, 2 * 5 + 4].tolist() == [7.0] * 4
    assert centre[0].abs().sum(-1).nonzero().flatten().tolist() == [0, 14] and tokens.abs().sum() == 0
    words = word_tokens.replace_tokens(tokens, objects, "words", word)
    assert words[0, :5, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]
