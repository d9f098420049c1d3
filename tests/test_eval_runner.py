"""The evaluation harness on world-bench and on converted benchmark files: baselines at chance and
100 %, batching, resume after an interruption, per-item errors, reports, the CLI, and a tiny random
tinyomni model end to end."""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import shutil

import pytest
from PIL import Image

from tinyomni import eval as te
from tinyomni import world
from tinyomni.errors import InputError
from tinyomni.eval import cli as eval_cli
from tinyomni.eval.tasks import Item

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    return world.write_bench(tmp_path_factory.mktemp("bench"), n=10)


def quiet(**kw) -> te.RunConfig:
    return te.RunConfig(progress=False, **kw)


def test_oracle_scores_100_on_every_world_skill(bench, tmp_path):
    items = te.prepare_items(te.load_task(bench), quiet())
    summary = te.evaluate(te.OracleModel(items), items, tmp_path, "oracle", quiet())
    assert set(summary["tasks"]) == set(world.SKILLS)
    assert all(t["score"] == 100.0 for t in summary["tasks"].values()), summary["tasks"]
    assert summary["average"] == 100.0 and summary["n"] == 10 * len(world.SKILLS)
    assert (tmp_path / "summary.md").read_text().count("| 100.0 |") == len(world.SKILLS)


def test_random_guess_scores_at_chance_on_world_bench(bench, tmp_path):
    items = te.prepare_items(te.load_task(bench), quiet())
    summary = te.evaluate(te.RandomGuessModel(items, seed=0), items, tmp_path, "random", quiet())
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    closed = [r for r in rows if r["n_options"] and r["metric"] != "multiple_choice"]
    expected = sum(1 / r["n_options"] for r in closed)
    sigma = math.sqrt(sum(1 / r["n_options"] * (1 - 1 / r["n_options"]) for r in closed))
    assert abs(sum(r["score"] for r in closed) - expected) < 3 * sigma
    for name, t in summary["tasks"].items():
        if t["metric"] in ("anls", "wer") or name == "speech_math":  # open answers: near zero
            assert t["score"] < 20, (name, t)
        if name in ("color", "exists", "multi_same", "video_direction"):
            assert "chance" in t and abs(t["score"] - t["chance"]) < 40


def test_random_guess_matches_chance_closely_on_many_items(tmp_path):
    items = [Item(f"k{k}-{i}", f"question {k}-{i}", ["x0"], task=f"k{k}",
                  candidates=[f"x{j}" for j in range(k)])
             for k in (2, 4, 8) for i in range(1000)]
    summary = te.evaluate(te.RandomGuessModel(items, seed=1), items, tmp_path, "random", quiet(batch_size=64))
    for k in (2, 4, 8):
        t = summary["tasks"][f"k{k}"]
        assert t["chance"] == pytest.approx(100 / k)
        assert abs(t["score"] - 100 / k) < 3 * 100 * math.sqrt((1 / k) * (1 - 1 / k) / 1000)


class Recorder:
    """A fake model: answers "yes", records batch sizes, can fail on cue."""

    def __init__(self, stop_after: int | None = None, bad: str | None = None):
        self.batches: list[int] = []
        self.stop_after, self.bad = stop_after, bad

    def chat(self, messages, max_new_tokens=64):
        if self.bad and self.bad in messages[-1]["content"][-1]["text"]:
            raise InputError("too long for the context")
        return "yes"

    def chat_batch(self, batch, max_new_tokens=64):
        if self.stop_after is not None and len(self.batches) >= self.stop_after:
            raise KeyboardInterrupt
        self.batches.append(len(batch))
        return [self.chat(m, max_new_tokens) for m in batch]


def _yes_no_items(n: int) -> list[Item]:
    return [Item(f"q{i}", f"Is it {i}?", ["yes" if i % 2 else "no"], metric="pope",
                 task="yn") for i in range(n)]


def test_batches_resume_and_per_item_errors(tmp_path):
    items = _yes_no_items(10)
    first = Recorder(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        te.evaluate(first, items, tmp_path, "m", quiet(batch_size=3))
    assert first.batches == [3, 3]
    path = tmp_path / "predictions.jsonl"
    with path.open("a") as f:
        f.write('{"id": "q6", "predic')  # a line cut off by the interruption
    second = Recorder(bad="Is it 8?")
    summary = te.evaluate(second, items, tmp_path, "m", quiet(batch_size=3))
    assert sum(second.batches) == 4  # only the 4 unanswered items were asked (q6..q9)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(i.id for i in items)
    assert next(r for r in rows if r["id"] == "q8")["error"].startswith("InputError")
    assert summary["errors"] == 1 and summary["n"] == 10 and summary["new_predictions"] == 4
    t = summary["tasks"]["yn"]
    assert t["yes_ratio"] == 100.0 and t["accuracy"] == 50.0  # "" (q8 failed) is a yes by POPE's rule
    again = Recorder()
    te.evaluate(again, items, tmp_path, "m", quiet())
    assert again.batches == []  # everything was done already
    te.evaluate(again, items, tmp_path, "m", quiet(resume=False))
    assert sum(again.batches) == 10


def test_limit_and_circular_prepare(bench):
    items = te.load_task(bench)
    limited = te.prepare_items(items, te.RunConfig(limit=2))
    assert len(limited) == 2 * len(world.SKILLS)
    circular = te.prepare_items(items, te.RunConfig(limit=2, circular=True))
    assert len(circular) == len(limited) + 2 * 3  # two relation items, 4 rotations each instead of 1


def test_tiny_random_model_runs_end_to_end(bench, tmp_path):
    api = pytest.importorskip("tinyomni.api")
    model = api.tiny_random_model(seed=0)
    items = te.prepare_items(te.load_task(bench), quiet(limit=1))
    summary = te.evaluate(model, items, tmp_path, "tiny-random", quiet(batch_size=4, max_new_tokens=4))
    assert summary["n"] == len(world.SKILLS) and summary["errors"] == 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert 0 <= summary["average"] <= 100


def test_task_files_are_validated(tmp_path):
    path = tmp_path / "t.jsonl"
    cases = [
        ('{"question": "q"}', "needs 'answers'"),
        ('{"question": "q", "answer": "a", "metric": "bleu"}', "unknown metric"),
        ('{"question": "q", "answer": "x", "choices": ["a", "b"]}', "option letters"),
        ('{"question": "q", "answer": "a", "image": "missing.png"}', "media file not found"),
        ('{"question": "q", "answer": "a", "id": 1}\n{"question": "q", "answer": "a", "id": 1}',
         "duplicate id"),
        ("not json", "not valid JSON"),
    ]
    for text, message in cases:
        path.write_text(text + "\n")
        with pytest.raises(InputError, match=message):
            te.load_task(path)
    path.write_text('{"question": "Which?", "answer": "B", "choices": ["x", "y"], "system": "Be brief."}\n')
    item = te.load_task(path)[0]
    assert item.id == "t-1" and item.task == "t" and item.metric == "exact_match"
    msgs = te.item_messages(item)
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["content"][-1]["text"] == "Which?\nA. x\nB. y\n" + te.tasks.MC_INSTRUCTION


# --- converters for published formats -------------------------------------------------------------

def _png(path, color=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def test_converters_read_published_formats(tmp_path):
    images = tmp_path / "val2014"
    _png(images / "COCO_val2014_000000000042.jpg")
    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text('{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog?", '
                    '"label": "no"}\n')
    (tmp_path / "mme" / "existence").mkdir(parents=True)
    _png(tmp_path / "mme" / "existence" / "0001.png")
    (tmp_path / "mme" / "existence" / "0001.txt").write_text("Is there a cat?\tYes\nIs there a dog?\tNo\n")
    _png(tmp_path / "mme" / "artwork" / "images" / "10.jpg")
    (tmp_path / "mme" / "artwork" / "questions_answers_YN").mkdir(parents=True)
    qa = tmp_path / "mme" / "artwork" / "questions_answers_YN" / "10.txt"
    qa.write_text("Is it old?\tYes\nIs it new?\tNo\n")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   "7\tWhat is it?\tnan\tcat\tdog\tnan\tnan\tB\tanimals\t"
                   f"{base64.b64encode(buffer.getvalue()).decode()}\n")
    (tmp_path / "questions.json").write_text(json.dumps(
        {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "What color?",
                                                   "question_id": 5}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 5, "answer_type": "other", "answers": [{"answer": "red"}] * 10}]}))
    _png(tmp_path / "png" / "c1.png")
    (tmp_path / "test_human.json").write_text(json.dumps([{"imgname": "c1.png", "query": "Max?",
                                                           "label": "41"}]))
    (tmp_path / "ls" / "19" / "198").mkdir(parents=True)
    (tmp_path / "ls" / "19" / "198" / "19-198.trans.txt").write_text("19-198-0001 HELLO WORLD\n")
    (tmp_path / "ls" / "19" / "198" / "19-198-0001.flac").write_bytes(b"fLaC")

    out = tmp_path / "tasks"
    jobs = [("pope", pope, images, 1, "pope"), ("mme", tmp_path / "mme", None, 4, "mme"),
            ("mmbench", tsv, None, 1, "multiple_choice"),
            ("vqav2", tmp_path / "questions.json", images, 1, "vqa"),
            ("chartqa", tmp_path / "test_human.json", None, 1, "relaxed"),
            ("librispeech", tmp_path / "ls", None, 1, "wer")]
    all_items = []
    for fmt, source, imgs, n, metric in jobs:
        items = te.load_task(te.convert(fmt, source, out / f"{fmt}.jsonl", images=imgs))
        assert len(items) == n and {i.metric for i in items} == {metric}, fmt
        all_items += items
    pope_item = next(i for i in all_items if i.metric == "pope")
    assert pope_item.category == "adversarial" and pope_item.answers == ["no"]
    mme_items = [i for i in all_items if i.metric == "mme"]
    assert {i.category for i in mme_items} == {"existence", "artwork"} and mme_items[0].answers == ["yes"]
    mc = next(i for i in all_items if i.metric == "multiple_choice")
    assert mc.choices == ["cat", "dog"] and mc.answers == ["B"]
    assert next(i for i in all_items if i.metric == "vqa").answers == ["red"] * 10
    summary = te.evaluate(te.OracleModel(all_items), all_items, tmp_path / "run", "oracle", quiet())
    assert all(t["score"] == 100.0 for t in summary["tasks"].values())
    with pytest.raises(InputError, match="needs --images"):
        te.convert("pope", pope, out / "x.jsonl")


# --- reports and CLI -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyomni")
    eval_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_run_baselines_and_compare(bench, tmp_path):
    parser = _parser()
    for baseline in ("oracle", "random"):
        args = parser.parse_args(["eval", "run", str(bench), "--baseline", baseline, "--limit", "4",
                                  "--out", str(tmp_path / baseline), "--circular"])
        assert args.func(args) == 0
    oracle = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    assert oracle["average"] == 100.0 and oracle["config"]["circular"]
    chart, table = tmp_path / "cmp.png", tmp_path / "cmp.md"
    args = parser.parse_args(["eval", "compare", str(tmp_path / "oracle"), str(tmp_path / "random"),
                              "--out", str(chart), "--md", str(table)])
    assert args.func(args) == 0
    assert "| color | 100.0 |" in table.read_text() and "**average**" in table.read_text()
    image = Image.open(chart)
    assert image.width > 500 and image.height > 20 * len(world.SKILLS)
    with pytest.raises(InputError, match="exactly one"):
        args = parser.parse_args(["eval", "run", str(bench), "--baseline", "oracle", "--model", "x"])
        args.func(args)
