"""Distillation: `tinyomni distill` against tinyomni's own server on loopback (data written, read back by
the training data loader, resumed after a kill, clear errors), and the `distill` / `distill_vision`
stages on tiny models (the loss against a hand computation, a distilled student closer to its teacher
than an undistilled one, vision features learnt through a width map).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from serve_support import free_port, running_server, torch_threads, varied_tiny_model, wav_bytes

import tinyomni
from tinyomni import api, world
from tinyomni.errors import ConfigError, InputError
from tinyomni.eval.endpoint import EndpointError, EndpointModel
from tinyomni.model.omni import OmniModel
from tinyomni.serve.server import ServerOptions
from tinyomni.train import cli as train_cli
from tinyomni.train import load_recipe, recipe_from_dict, train
from tinyomni.train.data import IGNORE, DataSpec, RecordSource, chat_example
from tinyomni.train.distill import distill
from tinyomni.train.distill_stage import (
    DistillBatches,
    check_same_tokenizer,
    distill_example,
    distillation_loss,
    resize_grid,
)
from tinyomni.train.recipe import StageSpec

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-distill-test-0123456789"
MAX_TOKENS = 6
DATA = {"skills": ["color", "shape"], "difficulty": {"image_size": 56}}


# --- the endpoint teacher --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_server():
    with torch_threads(1), running_server(varied_tiny_model(seed=1), ServerOptions(api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """World records (images), a two-turn chat record with audio, a prompt-only text record and a LLaVA one."""
    folder = tmp_path_factory.mktemp("in")
    path = world.write_dataset(folder, skills=["color", "shape"], n=2, split="train")
    (folder / "tone.wav").write_bytes(wav_bytes(0.4))
    image = json.loads(path.read_text().splitlines()[0])["image"]
    extra = [
        {"id": "chat-audio", "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": "tone.wav"}, {"type": "text", "text": "Hear?"}]},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "old answer 2"}]},
        {"id": "text-only", "messages": [{"role": "user", "content": "Name a colour."}]},
        {"id": "llava", "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": "a shape"}]},
    ]
    with path.open("a") as f:
        for record in extra:
            f.write(json.dumps(record) + "\n")
    return path


class Counting(EndpointModel):
    """The endpoint client, counting its requests."""

    calls = 0

    def chat(self, *args, **kwargs):
        type(self).calls += 1
        return super().chat(*args, **kwargs)


def _teacher(url: str, cls=EndpointModel, **kw) -> EndpointModel:
    return cls(url, "tiny-random", api_key=KEY, concurrency=3, retries=1, backoff=0.01, **kw)


def test_distilled_data_round_trips_through_the_data_loader(teacher_server, dataset, tmp_path, tiny, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("MY_TEACHER_KEY", KEY)
    out = tmp_path / "elsewhere" / "distilled.jsonl"  # another folder: media paths must be rewritten
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(["distill", "--teacher", teacher_server, "--teacher-model", "tiny-random", "--data",
                              str(dataset), "--out", str(out), "--api-key-env", "MY_TEACHER_KEY", "--max-tokens",
                              str(MAX_TOKENS), "--concurrency", "3", "--no-progress"])
    rc = args.func(args)
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert KEY not in printed.out + printed.err and KEY not in out.read_text()  # the key is never written
    records = [json.loads(line) for line in out.read_text().splitlines()]
    n_in = len(dataset.read_text().splitlines())
    assert len(records) == n_in == 7 and sorted(r["distill"]["index"] for r in records) == list(range(n_in))
    by_id = {r["id"]: r for r in records}
    # Every assistant turn is the teacher's: asked again, in order, with its own earlier answers.
    chat = by_id["chat-audio"]["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert "old answer" not in (chat[1]["content"], chat[3]["content"])
    assert [m["role"] for m in by_id["text-only"]["messages"]] == ["user", "assistant"]
    # The served teacher answers greedily as the same model does locally: the answer is the teacher's.
    teacher = varied_tiny_model(seed=1)
    with torch_threads(1):
        expected = teacher.chat([{"role": "user", "content": "Name a colour."}], max_new_tokens=MAX_TOKENS,
                                temperature=0.0)
    assert by_id["text-only"]["messages"][-1]["content"] == expected
    # The written file trains as it is: media resolve from its own folder, labels are the teacher's answers.
    stage = StageSpec(steps=1, batch_size=n_in, train=["x"], data=DataSpec(jsonl=str(out)))
    source = RecordSource(stage.data)
    make = chat_example(tiny.processor, stage)
    for j in range(n_in):
        record, root = source(j)
        example = make(j, record, root)
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        targets = tiny.tokenizer.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=False)
        assert targets == "".join(a + "<|im_end|>" for a in answers)
        if record["id"] == "chat-audio":
            assert len(example.audio_features) == 1
        elif record["id"] != "text-only":
            assert example.pixel_values is not None
    assert not Path(by_id["llava"]["messages"][0]["content"][0]["image"]).is_absolute()


def test_resume_skips_done_records_and_survives_a_cut_line(teacher_server, dataset, tmp_path):
    out = tmp_path / "out.jsonl"
    first = distill(dataset, out, _teacher(teacher_server), max_tokens=MAX_TOKENS, limit=4, progress=False)
    assert first.written == 4 and first.skipped == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed while writing the 4th line
    Counting.calls = 0
    again = distill(dataset, out, _teacher(teacher_server, Counting), max_tokens=MAX_TOKENS, progress=False)
    # 3 records kept; the cut one and the 3 beyond the first run's limit are asked, one request per turn.
    assert again.skipped == 3 and again.written == 4 and not again.failed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["distill"]["index"] for r in records) == list(range(7))
    asked = sum(1 for r in records if r["distill"]["index"] not in {json.loads(x)["distill"]["index"]
                                                                     for x in lines[:3]}
                for m in r["messages"] if m["role"] == "assistant")
    assert Counting.calls == asked
    Counting.calls = 0
    done = distill(dataset, out, _teacher(teacher_server, Counting), max_tokens=MAX_TOKENS, progress=False)
    assert (done.written, done.skipped, Counting.calls) == (0, 7, 0)


def test_clear_errors(teacher_server, dataset, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EndpointError, match="cannot reach"):
        distill(dataset, tmp_path / "a.jsonl", _teacher(nobody), progress=False)
    with pytest.raises(EndpointError, match="HTTP 401") as refused:
        distill(dataset, tmp_path / "b.jsonl", EndpointModel(teacher_server, "tiny-random", api_key="sk-wrong-key-777",
                                                                retries=0), progress=False)
    assert "sk-wrong-key-777" not in str(refused.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        distill(bad, tmp_path / "c.jsonl", _teacher(nobody), progress=False)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "m", "messages": [{"role": "user", "content": [
        {"type": "image", "image": "gone.png"}, {"type": "text", "text": "?"}]}]}) + "\n")
    with pytest.raises(InputError, match="media file not found: .*gone.png"):  # before any request
        distill(missing, tmp_path / "d.jsonl", _teacher(nobody), progress=False)
    out = tmp_path / "e.jsonl"  # an output made from other data is not mixed with new answers
    distill(dataset, out, _teacher(teacher_server), max_tokens=MAX_TOKENS, limit=1, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "different"}]}) + "\n")
    with pytest.raises(InputError, match="other records"):
        distill(other, out, _teacher(teacher_server), progress=False)


class BusyTeacher:
    """A loopback stub that answers 429 (Retry-After: 0), then 503, then every request: "fine"."""

    def __init__(self, failures: list[int]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub, self.failures, self.requests = self, list(failures), 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests += 1
                if stub.failures:
                    self.send_response(stub.failures.pop(0))
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_busy_answers_are_retried_with_backoff(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    busy = BusyTeacher([429, 503])
    try:
        result = distill(data, tmp_path / "out.jsonl", EndpointModel(busy.url, "m", retries=2, backoff=0.01),
                         progress=False)
        assert result.written == 1 and busy.requests == 3
        busy.failures = [503, 503, 503]  # still busy after the retries: the run stops, saying what is kept
        (tmp_path / "more.jsonl").write_text(data.read_text() * 2)
        with pytest.raises(EndpointError, match="(?s)HTTP 503.*run the same command again"):
            distill(tmp_path / "more.jsonl", tmp_path / "out2.jsonl",
                    EndpointModel(busy.url, "m", retries=2, backoff=0.01, concurrency=1), progress=False)
    finally:
        busy.server.shutdown()
        busy.server.server_close()


# --- local teachers --------------------------------------------------------------------------------

def wide_teacher(seed: int) -> api.Model:
    """A tiny model with a wider vision tower at a larger tile (84 px: 9 image tokens, the student has 4)
    and a decoder of larger random weights, so its answer distributions are far from the student's."""
    base = tinyomni.tiny_random_model(seed)
    config = copy.deepcopy(base.config)
    config.vision = dataclasses.replace(config.vision, image_size=84, hidden_size=48, intermediate_size=96)
    with api._seeded(seed):
        model = OmniModel(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.language_model.named_parameters()):
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return api.Model(model, base.tokenizer, base.chat_template, name="wide-teacher")


@pytest.fixture(scope="module")
def dirs(tiny, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"student": str(tiny.save(root / "student")), "teacher": str(wide_teacher(7).save(root / "teacher"))}


def distill_recipe(dirs, out: Path, kind: str = "distill", steps: int = 6, **distill_fields) -> dict:
    stage = {"name": kind, "kind": kind, "steps": steps, "batch_size": 4, "lr": 5e-3, "max_tiles": 1, "data": DATA,
             "distill": {"teacher": dirs["teacher"], **distill_fields}}
    if kind != "distill_vision":
        stage.update(lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj"]},
                     train=["multi_modal_projector"], micro_batch_size=2)
    return {"model": {"base": dirs["student"]}, "stages": [stage],
            "run": {"out": str(out), "autocast": "none", "log_every": 1, "save_every": 100}}


def test_kl_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g) * 3
    targets = torch.tensor([0, 3, 10, 2, 2])
    kl, ce = distillation_loss(s, t, targets, temperature=2.0)
    by_hand = 0.0
    for i in range(5):
        ps = [float(x) for x in torch.softmax(s[i] / 2.0, 0)]
        pt = [float(x) for x in torch.softmax(t[i] / 2.0, 0)]
        by_hand += sum(q * (torch.tensor(q).log() - torch.tensor(p).log()) for p, q in zip(ps, pt))
    assert float(kl) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(ce) == pytest.approx(float(-torch.log_softmax(s, 1)[range(5), targets].sum()), rel=1e-6)
    cut, _ = distillation_loss(torch.cat([s, torch.full((5, 2), 9.0)], 1), torch.cat([t, torch.zeros(5, 2)], 1),
                               targets, 2.0, vocab=11)
    assert float(cut) == pytest.approx(float(kl))  # padded LM-head rows are not part of the vocabulary


def test_trainer_step_loss_is_the_hand_computed_mix(dirs, tmp_path):
    """The first logged loss, before any update: (1-α)·T²·KL + α·CE per answer token, from full forwards
    of both models on their own inputs (the teacher's image takes 9 tokens, the student's 4)."""
    T, alpha = 2.0, 0.3
    recipe = recipe_from_dict(distill_recipe(dirs, tmp_path / "run", steps=1, temperature=T, alpha=alpha))
    result = train(recipe, progress=False)
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    student, teacher = tinyomni.load(dirs["student"]), tinyomni.load(dirs["teacher"])
    stage = recipe.stages[0]
    batches = DistillBatches(stage, distill_example(student.processor, teacher.processor, stage),
                             RecordSource(stage.data), student.tokenizer.pad_token_id, recipe.run.seed)
    micro, _ = batches.step_batches(0)
    assert any(b.teacher is not None for b in micro)  # the teacher saw its own, longer inputs
    kl = ce = tokens = 0.0
    with torch.no_grad():
        for b in micro:
            tb = b.teacher or b.student
            s_logits, _ = student.model(b.student.input_ids, b.student.pixel_values, b.student.audio_features)
            t_logits, _ = teacher.model(tb.input_ids, tb.pixel_values, tb.audio_features)
            s_keep, t_keep = b.student.labels[:, 1:] != IGNORE, tb.labels[:, 1:] != IGNORE
            s_sel, t_sel = s_logits[:, :-1][s_keep], t_logits[:, :-1][t_keep]
            log_s, log_t = torch.log_softmax(s_sel / T, -1), torch.log_softmax(t_sel / T, -1)
            kl += float((log_t.exp() * (log_t - log_s)).sum())
            ce += float(F.cross_entropy(s_sel, b.student.labels[:, 1:][s_keep], reduction="sum"))
            tokens += int(s_keep.sum())
    assert logged["kl"] == pytest.approx(kl / tokens, rel=1e-4)
    assert logged["ce"] == pytest.approx(ce / tokens, rel=1e-4)
    assert logged["loss"] == pytest.approx(((1 - alpha) * T * T * kl + alpha * ce) / tokens, rel=1e-4)
    # A LoRA student: the adapters (zero at the start, so step 1 saw the plain student) moved.
    adapters = load_file(result.model_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapters.items())


def eval_kl(model: api.Model, teacher: api.Model, n: int = 8) -> float:
    """KL(teacher ‖ model) per answer token on held-out world samples, by full forwards."""
    stage = StageSpec(steps=1, batch_size=n, train=["x"], max_tiles=1,
                      data=DataSpec(skills=["color", "shape"], split="val", seed=5,
                                    difficulty={"image_size": 56}))
    batches = DistillBatches(stage, distill_example(model.processor, teacher.processor, stage),
                             RecordSource(stage.data), model.tokenizer.pad_token_id, 0)
    (b,), _ = batches.step_batches(0)
    tb = b.teacher or b.student
    with torch.no_grad():
        s_logits, _ = model.model(b.student.input_ids, b.student.pixel_values)
        t_logits, _ = teacher.model(tb.input_ids, tb.pixel_values)
        s = s_logits[:, :-1][b.student.labels[:, 1:] != IGNORE]
        t = t_logits[:, :-1][tb.labels[:, 1:] != IGNORE]
        return float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")) / len(s)


def test_distilled_student_is_closer_to_its_teacher_than_an_undistilled_one(dirs, tmp_path):
    kd = distill_recipe(dirs, tmp_path / "kd", steps=8)
    kd["stages"][0].update(train=["language_model"], lr=1e-2)
    del kd["stages"][0]["lora"]
    distilled = train(recipe_from_dict(kd), progress=False)
    sft = copy.deepcopy(kd)
    sft["run"]["out"] = str(tmp_path / "sft")
    sft["stages"][0]["kind"] = "sft"  # the same steps, data and trained parts, on the labels alone
    del sft["stages"][0]["distill"]
    undistilled = train(recipe_from_dict(sft), progress=False)
    teacher = tinyomni.load(dirs["teacher"])
    before = eval_kl(tinyomni.load(dirs["student"]), teacher)
    kd, plain = eval_kl(tinyomni.load(distilled.model_dir), teacher), eval_kl(tinyomni.load(undistilled.model_dir),
                                                                               teacher)
    print(f"KL to the teacher per answer token: start {before:.4f}, distilled {kd:.4f}, sft {plain:.4f}")
    assert kd < 0.8 * plain and kd < 0.8 * before, (before, kd, plain)


def test_vision_feature_distillation_learns_through_a_width_map(dirs, tmp_path):
    recipe = recipe_from_dict(distill_recipe(dirs, tmp_path / "v", kind="distill_vision", steps=8,
                                             feature_loss="cosine"))
    result = train(recipe, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses
    student, trained = tinyomni.load(dirs["student"]), tinyomni.load(result.model_dir)
    before = student.model.vision_tower.encoder.layers[0].mlp.fc1.weight
    after = trained.model.vision_tower.encoder.layers[0].mlp.fc1.weight
    assert not torch.equal(before, after)  # the student's tower trained ...
    assert torch.equal(student.model.language_model.lm_head.weight, trained.model.language_model.lm_head.weight)
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 36, 5, generator=g)
    assert resize_grid(grid, 16).shape == (2, 16, 5) and torch.equal(resize_grid(grid, 36), grid)


def test_tokenizers_must_match_and_recipes_check_their_fields(tiny, dirs, tmp_path):
    other = tinyomni.tiny_random_model(seed=2)
    other.tokenizer.add_special_tokens(["<extra-token>"])
    with pytest.raises(ConfigError, match="tokenizer has 49159 tokens"):
        check_same_tokenizer(tiny, other)
    check_same_tokenizer(tiny, tinyomni.load(dirs["teacher"]))
    for fields, message in [({"teacher": None}, "name the teacher"), ({"temperature": 0}, "temperature"),
                            ({"alpha": 1.5}, "alpha"), ({"feature_loss": "l1"}, "feature_loss")]:
        raw = distill_recipe(dirs, tmp_path / "x")
        raw["stages"][0]["distill"].update(fields)
        with pytest.raises(ConfigError, match=message):
            recipe_from_dict(raw)
    toy = load_recipe(ROOT / "recipes" / "toy-distill.toml")
    assert [s.kind for s in toy.stages] == ["distill_vision", "distill"]
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
