"""The trainer: label masking, LoRA, data order, a toy two-stage run, exact resume, a kill during a
checkpoint write, and DDP with 2 CPU processes against 1 process at the same global batch.

Every run uses the tiny random model, saved once as a checkpoint so subprocesses load it in a blink.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tinyomni
from tinyomni.errors import ConfigError
from tinyomni.model.lora import LoraConfig, LoRALinear, apply_lora, merge_lora
from tinyomni.train import checkpoint as ckpt
from tinyomni.train import load_recipe, train
from tinyomni.train.data import RecordSource, StageBatches, chat_example
from tinyomni.train.recipe import DataSpec, StageSpec
from tinyomni.train.trainer import train_mode

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "recipes" / "toy.toml"


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory) -> str:
    return str(tiny.save(tmp_path_factory.mktemp("tiny") / "tiny"))


def toy(tiny_dir: str, out: Path, *overrides: str):
    return load_recipe(TOY, [f'model.base="{tiny_dir}"', f'run.out="{out}"', *overrides])


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


# --- pieces ----------------------------------------------------------------------------------------

def test_training_example_labels_only_assistant_turns(tiny):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    prompt, labels = tiny.processor.training_example(conversation)
    assert len(labels) == len(prompt.input_ids)
    targets = tiny.tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert targets == "hello<|im_end|>4<|im_end|>"
    # The context of the last answer is tokenized exactly as inference tokenizes the prompt.
    inference = tiny.processor(conversation[:3]).input_ids
    assert prompt.input_ids[: len(inference)] == inference


def test_jsonl_records_with_multi_turn_messages(tiny, media, tmp_path):
    image = Path(media["red.png"])
    (tmp_path / image.name).write_bytes(image.read_bytes())
    record = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image.name}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "yes"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    stage = StageSpec(steps=1, batch_size=2, train=["x"], data=DataSpec(jsonl=str(tmp_path / "data.jsonl")))
    batches = StageBatches(stage, chat_example(tiny.processor, stage), RecordSource(stage.data), 0, seed=0)
    (batch,), dropped = batches.step_batches(0)
    assert dropped == 0 and batch.samples == 2 and batch.pixel_values is not None
    targets = tiny.tokenizer.decode([t for t in batch.labels[0].tolist() if t != -100], skip_special_tokens=False)
    assert targets == "red<|im_end|>yes<|im_end|>"


def test_extra_questions_ask_more_about_the_same_picture(tiny):
    stage = StageSpec(steps=1, batch_size=2, train=["x"],
                      data=DataSpec(skills=["color", "ocr"], extra_questions=3))
    batches = StageBatches(stage, chat_example(tiny.processor, stage), RecordSource(stage.data), 0, seed=0)
    (batch,), _ = batches.step_batches(0)
    assert batch.pixel_values.shape[0] == 2  # one picture per sample, however many questions
    targets = [tiny.tokenizer.decode([t for t in row.tolist() if t != -100], skip_special_tokens=False)
               for row in batch.labels]
    turns = [t.count("<|im_end|>") for t in targets]
    assert turns == [4, 1]  # the colour scene gets three more questions; the OCR picture has no objects


def test_replay_takes_a_fixed_even_share_of_the_samples(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(10)]
    (tmp_path / "replay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = RecordSource(DataSpec(skills=["color"], replay=str(tmp_path / "replay.jsonl"), replay_fraction=0.25))
    drawn = [source(j)[0] for j in range(40)]
    is_replay = ["messages" in r for r in drawn]
    assert all(sum(is_replay[i: i + 4]) == 1 for i in range(0, 40, 4))  # one in four, spread evenly
    replayed = [r["messages"][0]["content"] for r, rep in zip(drawn, is_replay) if rep]
    assert sorted(replayed) == [f"q{i}" for i in range(10)]  # each record once per epoch
    world_ids = [r["id"] for r, rep in zip(drawn, is_replay) if not rep]
    plain = RecordSource(DataSpec(skills=["color"]))
    assert world_ids == [plain(j)[0]["id"] for j in range(30)]  # the data's own samples, in order
    assert [source(j)[0].get("id") for j in range(40)] == [r.get("id") for r in drawn]  # pure function of j


def test_replay_data_is_the_base_models_answers_and_leaves_out_the_text_qa_set(tiny, tmp_path):
    from tinyomni.train.replay import make_replay, read_prompts

    prompts = read_prompts(ROOT / "recipes" / "data" / "replay_prompts.txt")
    held_out = {json.loads(line)["question"] for line in (ROOT / "examples" / "text_qa.jsonl").open()}
    assert len(prompts) > 200 and not set(prompts) & held_out
    shipped = [json.loads(line) for line in (ROOT / "recipes" / "data" / "smollm2_replay.jsonl").open()]
    assert len(shipped) > 0.8 * len(prompts)
    assert all(r["messages"][0]["content"] in prompts and r["messages"][1]["content"] for r in shipped)
    records, cut = make_replay(tiny, ["hi", "tell me more"], max_new_tokens=3, progress=False)
    assert len(records) + cut == 2
    # A recipe names replay data relative to itself.
    recipe = load_recipe(ROOT / "recipes" / "tinyomni-world.toml")
    assert Path(recipe.stages[-1].data.replay).is_file()
    with pytest.raises(ConfigError, match="replay"):
        StageSpec(train=["x"], data=DataSpec(replay="x.jsonl")).validate("stages.0")


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    before = model(x)
    names = apply_lora(model, LoraConfig(r=2, alpha=4, targets=["0", "2"], scope=""))
    assert names == ["0", "2"] and isinstance(model[0], LoRALinear)
    torch.testing.assert_close(model(x), before)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_()
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    assert merge_lora(model) == 2 and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_adapter_round_trip_through_a_checkpoint(tmp_path):
    model = tinyomni.tiny_random_model(seed=1)
    apply_lora(model.model, LoraConfig(r=2, alpha=4, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ids = torch.tensor([model.processor("hello there").input_ids])
    expected = model.model(ids)[0]
    path = model.save(tmp_path / "adapted")
    assert (path / "adapter_config.json").is_file()
    loaded = tinyomni.load(path)
    assert loaded.decoder_modified and not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    torch.testing.assert_close(loaded.model(ids)[0], expected, atol=1e-4, rtol=1e-4)


def test_data_order_splits_across_processes_and_buckets():
    stage = StageSpec(steps=4, batch_size=4, bucket_batches=2, train=["x"])

    def make(j, record, root):
        return SimpleNamespace(index=j, length=(j * 7) % 5)

    def indices(rank: int, world: int, step: int) -> list[int]:
        batches = StageBatches(stage, make, lambda j: ({}, None), 0, seed=0, rank=rank, world=world)
        batches.collate = lambda examples, pad: [e.index for e in examples]
        micro, _ = batches.step_batches(step)
        return sorted(i for m in micro for i in m)

    for step in range(4):
        one = indices(0, 1, step)
        assert len(one) == 4 and all(j // 8 == step // 2 for j in one)  # bucketed within its window
        assert indices(0, 1, step) == one  # a pure function of the step
    window = sorted(i for s in (0, 1) for i in indices(0, 1, s))
    assert window == list(range(8))
    # Two processes together see each window's samples exactly once.
    assert sorted(i for r in (0, 1) for s in (0, 1) for i in indices(r, 2, s)) == list(range(8))


def test_hard_negative_captions_change_one_object_and_count_only_as_negatives(tiny):
    from tinyomni import world
    from tinyomni.train.contrastive import ContrastiveModule
    from tinyomni.train.data import collate_pairs, hard_negative_captions, pair_example
    from tinyomni.train.recipe import TextTowerSpec

    records = [world.to_record(world.make_sample("caption", i, "train", 0)) for i in range(3)]
    records.append(world.to_record(world.make_sample("color", 0, "train", 0)))
    truth = records[0]["answers"][0]
    negatives = hard_negative_captions(records[0], 4, "seed")
    assert negatives == hard_negative_captions(records[0], 4, "seed")  # a function of the seed
    for text in negatives:
        a, b = truth.rstrip(".").split(), text.rstrip(".").split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert hard_negative_captions(records[3], 2, "seed") == [None, None]

    stage = StageSpec(kind="contrastive", hard_negatives=2, text_tower=TextTowerSpec(hidden_size=32, layers=1,
                                                                                   heads=2, embed_dim=16))
    make = pair_example(tiny.tokenizer, tiny.config, stage)
    batch = collate_pairs([make(i, r, None) for i, r in enumerate(records)], pad_id=0)
    assert batch.text_ids.shape[0] == 4 + 4 * 2 and batch.texts[4:6] != [None, None]
    assert batch.texts[-2:] == [None, None]
    torch.manual_seed(0)
    for loss in ("siglip", "clip"):
        module = ContrastiveModule(tiny.model.vision_tower, tiny.config.vision.hidden_size, "vision",
                                   len(tiny.tokenizer), stage.text_tower, loss)
        with_negatives = module(batch)
        plain = module(collate_pairs([dataclasses.replace(make(i, r, None), negative_ids=[], negatives=[])
                                      for i, r in enumerate(records)], pad_id=0))
        assert torch.isfinite(with_negatives) and with_negatives > plain  # more negatives, more loss
        with_negatives.backward()


def test_tag_loss_asks_the_encoder_for_every_word_of_its_caption(tiny):
    from tinyomni import world
    from tinyomni.train.contrastive import ContrastiveModule
    from tinyomni.train.data import collate_pairs, pair_example
    from tinyomni.train.recipe import TextTowerSpec

    records = [world.to_record(world.make_sample("caption", i, "train", 0)) for i in range(4)]
    stage = StageSpec(kind="contrastive", tag_loss=0.5, text_tower=TextTowerSpec(hidden_size=32, layers=1, heads=2,
                                                                                 embed_dim=16))
    make = pair_example(tiny.tokenizer, tiny.config, stage)
    batch = collate_pairs([make(i, r, None) for i, r in enumerate(records)], pad_id=0)
    words = [set(tiny.tokenizer.encode_piece(r["answers"][0])) for r in records]
    vocabulary = sorted(set.union(*words) | {7})  # 7: a token no caption has
    torch.manual_seed(0)
    encoder = tiny.model.vision_tower
    module = ContrastiveModule(encoder, tiny.config.vision.hidden_size, "vision", len(tiny.tokenizer),
                               stage.text_tower, "siglip", tag_loss=stage.tag_loss, tag_vocabulary=vocabulary)
    pooled = module.pool_media(batch)
    # The target of sample i over the tag vocabulary is exactly the set of words of its caption.
    logits = module.tag_head(torch.cat(pooled, -1)).float()
    target = torch.tensor([[float(t in ids) for t in vocabulary] for ids in words])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 4
    assert torch.allclose(module.tag_loss(pooled, batch), expected)
    # It is added to the contrastive loss, and its gradient reaches the encoder through the tag head.
    encoder.zero_grad()
    module.tag_loss(module.pool_media(batch), batch).backward()
    assert encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    without = ContrastiveModule(encoder, tiny.config.vision.hidden_size, "vision", len(tiny.tokenizer),
                                stage.text_tower, "siglip")
    without.load_state_dict(module.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.allclose(module(batch), without(batch) + 0.5 * module.tag_loss(module.pool_media(batch), batch))
    # A question with its answer is no description ("Is there a red star? no" has no red star, and
    # leaves the rest of the scene out): it adds nothing to the tag loss.
    question = world.to_record(world.make_sample("exists", 0, "train", 0))
    mixed = collate_pairs([make(i, r, None) for i, r in enumerate(records[:2] + [question])], pad_id=0)
    assert mixed.describes.tolist() == [True, True, False]
    with torch.no_grad():
        pooled = module.pool_media(mixed)
        captions_only = module.tag_loss(tuple(p[:2] for p in pooled), collate_pairs(
            [make(i, r, None) for i, r in enumerate(records[:2])], pad_id=0))
        assert torch.allclose(module.tag_loss(pooled, mixed), captions_only * 2 / 3)
    with pytest.raises(ConfigError, match="tag_loss is for contrastive stages"):
        StageSpec(kind="sft", train=["x"], tag_loss=1.0).validate("stages.0")


def test_tag_vocabulary_is_the_words_of_the_descriptions(tiny):
    from tinyomni.train.data import RecordSource, pair_text, tag_vocabulary
    from tinyomni.train.recipe import TextTowerSpec

    stage = StageSpec(kind="contrastive", tag_loss=1.0, data=DataSpec(skills=["caption", "exists"]),
                      text_tower=TextTowerSpec(hidden_size=32, layers=1, heads=2, embed_dim=16))
    source = RecordSource(stage.data)
    vocabulary = tag_vocabulary(source, tiny.tokenizer, stage, n=40)
    assert vocabulary == tag_vocabulary(RecordSource(stage.data), tiny.tokenizer, stage, n=40)  # every process
    records = [source(j)[0] for j in range(40)]
    captions = {t for r in records if r["task"] == "caption" for t in tiny.tokenizer.encode_piece(pair_text(r))}
    assert set(vocabulary) == captions  # the questions' words ("Is", "?", "yes") are not tags
    assert tiny.tokenizer.encode_piece("?")[0] not in vocabulary
    with pytest.raises(ConfigError, match="tag_loss needs descriptive texts"):
        tag_vocabulary(RecordSource(DataSpec(skills=["exists"])), tiny.tokenizer, stage, n=10)


def test_tag_loss_on_audio_pools_only_the_real_frames(tiny):
    # Clips of different lengths share a right-padded batch: the padding must change neither the
    # pooled features nor the tag loss of a clip.
    from tinyomni.train.contrastive import ContrastiveModule
    from tinyomni.train.data import PairExample, collate_pairs
    from tinyomni.train.recipe import TextTowerSpec

    n_mels = tiny.config.audio.num_mel_bins
    examples = [PairExample(i, torch.randn(n_mels, frames), ids, text)
                for i, (frames, ids, text) in enumerate([(40, [5, 6, 7], "a b c"), (64, [8, 9], "d e"),
                                                         (24, [5, 9], "a e")])]
    module = ContrastiveModule(tiny.model.audio_tower, tiny.config.audio.d_model, "audio", len(tiny.tokenizer),
                               TextTowerSpec(hidden_size=32, layers=1, heads=2, embed_dim=16), "siglip",
                               audio_config=tiny.config.audio, tag_loss=1.0, tag_vocabulary=[5, 6, 7, 8, 9]).eval()
    with torch.no_grad():
        batch = collate_pairs(examples, pad_id=0)
        mean, peak = module.pool_media(batch)
        alone = [module.pool_media(collate_pairs([e], pad_id=0)) for e in examples]
        assert torch.allclose(mean, torch.cat([m for m, _ in alone]), atol=1e-5)
        assert torch.allclose(peak, torch.cat([p for _, p in alone]), atol=1e-5)
        per_clip = [module.tag_loss(p, collate_pairs([e], pad_id=0)) for p, e in zip(alone, examples)]
        assert torch.allclose(module.tag_loss((mean, peak), batch), sum(per_clip) / 3, atol=1e-4)
        assert torch.isfinite(module(batch))


def test_frozen_batchnorm_keeps_its_running_statistics():
    # A stage that does not train a conv stem must not move the BatchNorm statistics it learnt before.
    frozen, trained = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, trained)
    train_mode(model)
    model(torch.randn(4, 3, 2, 2) + 5)
    assert model.training and trained.training and not frozen.training
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and trained.running_mean.min() > 0.1


def test_recipe_rejects_typos_and_takes_overrides(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stages]]\nname = "a"\nkind = "sft"\ntrain = ["x"]\nlearning_rate = 1.0\n')
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(bad)
    recipe = load_recipe(TOY, ["stages.1.steps=3", "run.out=runs/elsewhere", "stages.1.lora.r=2"])
    assert recipe.stages[1].steps == 3 and recipe.run.out == "runs/elsewhere" and recipe.stages[1].lora.r == 2


# --- runs ------------------------------------------------------------------------------------------

def test_toy_two_stage_recipe_loss_falls_and_exports(tiny_dir, tmp_path):
    # bf16 autocast (frozen weights stored in bf16) and an evaluation through the eval harness at the end.
    recipe = toy(tiny_dir, tmp_path / "run", "run.autocast=bfloat16", "eval.at_end=true", "eval.n=1",
                 'eval.skills=["color", "count"]', "eval.max_new_tokens=2")
    result = train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for stage in ("vision-pretrain", "instruct"):
        losses = [r["loss"] for r in rows if r["stage"] == stage and r["type"] == "train"]
        assert len(losses) == 6 and losses[-1] < losses[0], (stage, losses)
    assert all(r["samples_per_s"] > 0 for r in rows if r["type"] == "train")
    evals = [r for r in rows if r["type"] == "eval"]
    assert len(evals) == 1 and set(evals[0]["tasks"]) == {"color", "count"}
    assert (tmp_path / "run" / "eval" / "step-0000012" / "summary.json").is_file()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    # The final model keeps its LoRA weights as an adapter, and loads (merged) like any checkpoint.
    assert (result.model_dir / "adapter_model.safetensors").is_file()
    model = tinyomni.load(result.model_dir)
    assert not any(isinstance(m, LoRALinear) for m in model.model.modules())
    assert isinstance(model.chat("hi", max_new_tokens=3), str)


def test_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    overrides = ("stages.0.steps=3", "stages.1.steps=4", "run.save_every=2")
    straight = train(toy(tiny_dir, tmp_path / "a", *overrides), progress=False)
    # Stop in the middle of a length-bucketing window of the LoRA stage, then continue.
    first = train(toy(tiny_dir, tmp_path / "b", *overrides), progress=False, stop_after=4)
    assert first.model_dir is None and ckpt.latest_checkpoint(tmp_path / "b").name == "step-0000004"
    second = train(toy(tiny_dir, tmp_path / "b", *overrides), progress=False, resume=True)
    assert second.global_step == straight.global_step == 7
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")  # bit for bit


STEM_RECIPE = """
name = "stem"
[model]
base = "smollm2"
[model.vision]
image_size = 32
patch_size = 8
hidden_size = 32
intermediate_size = 48
num_hidden_layers = 1
num_attention_heads = 2
conv_stem = [8, 8, 16]
[model.audio]
d_model = 32
encoder_layers = 1
encoder_attention_heads = 2
encoder_ffn_dim = 32
[run]
autocast = "none"
save_every = 2
log_every = 1
[[stages]]
name = "vision-pretrain"
kind = "contrastive"
tower = "vision"
steps = 4
batch_size = 4
lr = 3e-3
tag_loss = 1.0
text_tower = { hidden_size = 32, layers = 1, heads = 2, embed_dim = 32 }
data = { skills = ["caption", "color"], difficulty = { image_size = 64 } }
"""


def test_resume_keeps_the_batchnorm_statistics_of_a_conv_stem_and_the_tag_head(tmp_path):
    (tmp_path / "stem.toml").write_text(STEM_RECIPE)
    def recipe(out: str):
        return load_recipe(tmp_path / "stem.toml", [f'run.out="{tmp_path / out}"'])
    straight = train(recipe("a"), progress=False)
    train(recipe("b"), progress=False, stop_after=2)
    resumed = train(recipe("b"), progress=False, resume=True)
    a = tinyomni.load(straight.model_dir).model.vision_tower.embeddings.conv_stem[0].norm
    b = tinyomni.load(resumed.model_dir).model.vision_tower.embeddings.conv_stem[0].norm
    assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 4
    assert torch.equal(a.running_var, b.running_var) and not torch.equal(a.running_var, torch.ones(8))
    assert logged_losses(tmp_path / "a") == logged_losses(tmp_path / "b")[-4:]  # the tag head resumed too
    # The linear probe reads a tower from a training checkpoint too (shaped by the run's recipe.json).
    out = subprocess.run([sys.executable, str(ROOT / "diagnostics" / "probe_vision.py"),
                          str(tmp_path / "b" / "checkpoints" / "step-0000004"), "--train", "40", "--val", "20"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "majority guess" in out.stdout and "trained" in out.stdout
    assert "trained tower's patch" in out.stdout  # the per-object probe (a checkpoint has no projector row)


KILLED_RUN = """
import sys, time, torch
from pathlib import Path
from tinyomni.train import load_recipe, train
saves = []
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if Path(f).name == "optimizer.pt":
        saves.append(f)
        if len(saves) == 2:  # the second checkpoint: half written when the parent kills us
            Path(sys.argv[2]).write_text(str(f))
            time.sleep(120)
torch.save = slow_save
train(load_recipe(sys.argv[1], sys.argv[3:]), progress=False)
"""


def test_kill_during_checkpoint_write_keeps_previous(tiny_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    args = [f'model.base="{tiny_dir}"', f'run.out="{out}"', "stages.0.steps=2", "stages.1.steps=2",
            "run.save_every=2"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(TOY), str(marker), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached its second checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert Path(marker.read_text()).parent.name.startswith(".step-0000004.tmp-")  # killed mid-write
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and latest.name == "step-0000002"
    state, weights, _ = ckpt.load_checkpoint(latest)
    assert state.global_step == 2 and weights
    result = train(load_recipe(TOY, args), progress=False, resume=True)
    assert result.global_step == 4 and result.model_dir is not None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_ddp_two_processes_match_one(tiny_dir, tmp_path):
    overrides = ["stages.0.steps=2", "stages.1.steps=3", "stages.1.bucket_batches=1", "run.autocast=none"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tinyomni.train.cli", str(TOY), "--no-progress", "--out", str(tmp_path / "ddp"),
           "--set", f'model.base="{tiny_dir}"'] + [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    train(toy(tiny_dir, tmp_path / "one", *overrides), progress=False)
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "ddp")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-4)
