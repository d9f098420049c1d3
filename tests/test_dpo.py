"""Preference alignment (`kind = "dpo"`): the loss equals TRL's on the same tiny model and batch, the
reference is the stage's frozen starting point, a run resumes exactly, preference records (with
media, multi-turn prompts) train only on the final answers, and `tinyomni world preferences` turns
a model's mistakes into pairs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tinyomni
from tinyomni.errors import ConfigError
from tinyomni.model.lora import LoraConfig, apply_lora, merge_lora
from tinyomni.train import checkpoint as ckpt
from tinyomni.train import load_recipe, train
from tinyomni.train.data import IGNORE, RecordSource, StageBatches, preference_example
from tinyomni.train.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
TOY_DPO = ROOT / "recipes" / "toy-dpo.toml"

TEXT_PAIRS = [("What is 2+2?", "4", "5"), ("Capital of France?", "Paris", "Lyon, I think"),
              ("Say hi.", "hi", "bye bye"), ("Colour of the sky?", "blue", "green"),
              ("What is 3+3?", "6", "seven"), ("Opposite of up?", "down", "sideways"),
              ("First letter?", "A", "Z"), ("Is ice cold?", "yes", "no, it is hot")]


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory) -> str:
    return str(tiny.save(tmp_path_factory.mktemp("tiny") / "tiny"))


@pytest.fixture(scope="module")
def text_prefs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n" for q, c, r in TEXT_PAIRS))
    return path


def rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def dpo_recipe(tiny_dir: str, data: Path, out: Path, dpo: dict) -> dict:
    return {"name": "dpo", "model": {"base": tiny_dir},
            "run": {"out": str(out), "autocast": "none", "save_every": 1, "keep_checkpoints": 5, "log_every": 1},
            "stages": [{"name": "dpo", "kind": "dpo", "steps": 2, "batch_size": 4, "micro_batch_size": 2,
                        "lr": 5e-2, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
                        "dpo": dpo, "data": {"jsonl": str(data)}}]}


def hf_llama(model: tinyomni.api.Model):
    import transformers

    d = model.config.decoder
    config = transformers.LlamaConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps, rope_theta=d.rope_theta, tie_word_embeddings=d.tie_word_embeddings)
    hf = transformers.LlamaForCausalLM(config)
    state = {k[len("language_model."):]: v for k, v in model.model.state_dict().items()
             if k.startswith("language_model.")}
    hf.load_state_dict(state, strict=False)  # a tied lm_head is the embedding
    return hf.eval()


TRL_CASES = {
    "dpo": ({"beta": 0.1}, {"loss_type": ["sigmoid"]}),
    "robust": ({"beta": 0.5, "loss": "robust", "label_smoothing": 0.1},
               {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "mpo": ({"beta": 0.2, "dpo_weight": 0.8, "quality_weight": 0.2, "sft_weight": 1.0},
            {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_equals_trl_on_the_same_model_and_batch(case, tiny_dir, text_prefs, tmp_path):
    # Step 2 of a LoRA dpo stage (two micro-batches of 2 pairs): the logged loss is computed with the
    # adapters of step 1 against the reference (the adapters off). TRL gets the same tokens, a Llama
    # with the merged weights as the policy and the base weights as its ref_model.
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    ours, theirs = TRL_CASES[case]
    recipe = recipe_from_dict(dpo_recipe(tiny_dir, text_prefs, tmp_path / "run", ours))
    train(recipe, progress=False)
    logged = rows(tmp_path / "run")[1]["loss"]

    base = tinyomni.load(tiny_dir)
    policy = tinyomni.load(tiny_dir)
    apply_lora(policy.model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    _, weights, _ = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000001")
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # step 1 moved the adapters
    policy.model.load_state_dict(weights, strict=False)
    merge_lora(policy.model)

    stage = recipe.stages[0]
    batches = StageBatches(stage, preference_example(base.processor, stage), RecordSource(stage.data),
                           base.tokenizer.pad_token_id, recipe.run.seed)
    examples, _ = batches.local_examples(1)
    features = []
    for e in examples:
        start = next(i for i, t in enumerate(e.chosen.labels) if t != IGNORE)
        prompt = e.chosen.input_ids[:start]
        assert e.rejected.input_ids[:start] == prompt

        def answer(example) -> list[int]:
            return [t for t in example.labels if t != IGNORE]

        assert e.chosen.input_ids[start: start + len(answer(e.chosen))] == answer(e.chosen)
        features.append({"prompt_ids": prompt, "chosen_ids": answer(e.chosen), "rejected_ids": answer(e.rejected)})

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.tokenizer.backend, eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = base.chat_template
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                  "chosen": [{"role": "assistant", "content": c}],
                                  "rejected": [{"role": "assistant", "content": r}]} for q, c, r in TEXT_PAIRS])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=ours["beta"], report_to="none", use_cpu=True,
                     bf16=False, activation_checkpointing=False, **theirs)
    trainer = DPOTrainer(model=hf_llama(policy), ref_model=hf_llama(base), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, trainer.data_collator(features)))
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-6), (logged, expected)
    assert abs(logged - math.log(2)) > 1e-3 or case != "dpo"  # the policy did move from the reference


def test_conservative_dpo_is_the_label_smoothed_sigmoid():
    # cDPO (TRL's label_smoothing with loss_type "sigmoid" before TRL 1.0): -(1-e) logσ(βΔ) - e logσ(-βΔ).
    from tinyomni.train.recipe import PreferenceSpec
    from tinyomni.train.trainer import preference_losses

    policy, reference = torch.tensor([-3.0, -1.0, -4.0, -2.5]), torch.tensor([-3.5, -1.2, -3.0, -2.0])
    spec = PreferenceSpec(beta=0.3, label_smoothing=0.2)
    delta = (policy[:2] - reference[:2]) - (policy[2:] - reference[2:])
    z = spec.beta * delta
    expected = -0.8 * torch.nn.functional.logsigmoid(z) - 0.2 * torch.nn.functional.logsigmoid(-z)
    terms = preference_losses(policy, reference, spec)
    torch.testing.assert_close(terms["dpo"], expected)
    torch.testing.assert_close(terms["margin"], z)
    assert float(terms["nll"]) == 4.0


@pytest.fixture(scope="module")
def toy_runs(tiny_dir, tmp_path_factory):
    """The toy dpo recipe (sft with LoRA, then dpo on the same adapters) straight, and stopped in the
    middle of the dpo stage then resumed."""
    root = tmp_path_factory.mktemp("toy")
    overrides = [f'model.base="{tiny_dir}"', "stages.0.steps=2", "stages.1.steps=4", "run.save_every=10"]
    straight = train(load_recipe(TOY_DPO, [*overrides, f'run.out="{root / "a"}"']), progress=False)
    first = train(load_recipe(TOY_DPO, [*overrides, f'run.out="{root / "b"}"']), progress=False, stop_after=4)
    assert first.model_dir is None
    second = train(load_recipe(TOY_DPO, [*overrides, f'run.out="{root / "b"}"']), progress=False, resume=True)
    return root, straight, second


def test_reference_is_where_the_dpo_stage_started(toy_runs):
    # The dpo stage continues the sft stage's adapters: its reference is the model as sft left it
    # (not the base with adapters off), so at its first step policy and reference agree exactly.
    root, straight, _ = toy_runs
    dpo = [r for r in rows(root / "a") if r["stage"] == "dpo"]
    assert len(dpo) == 4
    assert dpo[0]["reward_margin"] == 0.0 and dpo[0]["reward_accuracy"] == 0.0
    assert any(r["reward_margin"] != 0.0 for r in dpo[1:])
    model = tinyomni.load(straight.model_dir)
    assert isinstance(model.chat("hi", max_new_tokens=2), str)


def test_dpo_resumes_exactly(toy_runs):
    root, straight, resumed = toy_runs
    assert ckpt.latest_checkpoint(root / "b").name == "step-0000006"  # the stage end
    assert resumed.global_step == straight.global_step == 6
    _, weights, _ = ckpt.load_checkpoint(root / "b" / "checkpoints" / "step-0000004")
    assert any(k.startswith("reference.") and "lora_B" in k for k in weights)  # the sft adapters, as dpo began
    assert [r["loss"] for r in rows(root / "b")] == [r["loss"] for r in rows(root / "a")]  # bit for bit


def test_preference_records_with_media_train_only_the_final_answers(tiny, media, tmp_path):
    image = Path(media["red.png"])
    (tmp_path / image.name).write_bytes(image.read_bytes())
    record = {"prompt": [{"role": "user", "content": [{"type": "image", "image": image.name},
                                                      {"type": "text", "text": "Colour?"}]},
                         {"role": "assistant", "content": "maybe red"},
                         {"role": "user", "content": "Sure? One word."}],
              "chosen": [{"role": "assistant", "content": "red"}], "rejected": "blue"}
    (tmp_path / "prefs.jsonl").write_text(json.dumps(record) + "\n")
    recipe = recipe_from_dict({"stages": [{"kind": "dpo", "steps": 1, "batch_size": 2, "lora": {},
                                           "data": {"jsonl": str(tmp_path / "prefs.jsonl")}}]})
    stage = recipe.stages[0]
    batches = StageBatches(stage, preference_example(tiny.processor, stage), RecordSource(stage.data), 0, seed=0)
    (batch,), dropped = batches.step_batches(0)
    assert dropped == 0 and batch.samples == 2 and batch.chat.input_ids.shape[0] == 4
    assert batch.chat.pixel_values.shape[0] == 4  # the picture for every row
    answers = [tiny.tokenizer.decode([t for t in row.tolist() if t != IGNORE], skip_special_tokens=False)
               for row in batch.chat.labels]
    assert answers == ["red<|im_end|>", "red<|im_end|>", "blue<|im_end|>", "blue<|im_end|>"]
    assert batch.chosen_tokens == 2 * len(tiny.tokenizer.encode_piece("red<|im_end|>"))


def test_dpo_recipe_checks_its_fields():
    def stage(**dpo) -> dict:
        return {"stages": [{"kind": "dpo", "lora": {}, "dpo": dpo}]}

    with pytest.raises(ConfigError, match="label_smoothing"):
        recipe_from_dict(stage(label_smoothing=0.5))
    with pytest.raises(ConfigError, match="dpo.loss"):
        recipe_from_dict(stage(loss="ipo"))
    with pytest.raises(ConfigError, match="unknown stages.0.dpo field"):
        recipe_from_dict(stage(betta=0.1))
    with pytest.raises(ConfigError, match="weights"):
        recipe_from_dict(stage(dpo_weight=0.0))


class _HalfRight:
    """Answers right on every other question, wrong (with a fixed word) on the rest."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.calls = answers, 0

    def chat_batch(self, batch, max_new_tokens=32):
        out = []
        for messages in batch:
            text = messages[-1]["content"][-1]["text"]
            out.append(self.answers[text] if self.calls % 2 == 0 else "purple-ish")
            self.calls += 1
        return out


def test_world_preferences_pair_the_exact_answer_with_the_models_mistake(tiny, tmp_path):
    from tinyomni.world.generator import generate
    from tinyomni.world.preferences import make_preferences

    samples = list(generate(["color", "count"], n=3, split="val"))
    model = _HalfRight({s.question: s.answer for s in samples})
    counts = make_preferences(model, tmp_path / "prefs" / "prefs.jsonl", skills=["color", "count"], split="val", n=3)
    assert counts == {"color": {"asked": 3, "wrong": 1, "empty": 0, "right": 2},
                      "count": {"asked": 3, "wrong": 2, "empty": 0, "right": 1}}
    records = [json.loads(line) for line in (tmp_path / "prefs" / "prefs.jsonl").read_text().splitlines()]
    by_id = {s.id: s for s in samples}
    assert [r["id"] for r in records] == [samples[1].id, samples[3].id, samples[5].id]
    for r in records:
        assert r["chosen"] == by_id[r["id"]].answer and r["rejected"] == "purple-ish"
        image = r["prompt"][0]["content"][0]["image"]
        assert not Path(image).is_absolute() and (tmp_path / "prefs" / image).is_file()
    # The file is a dpo stage's data as it is.
    recipe = recipe_from_dict({"stages": [{"kind": "dpo", "batch_size": 3, "lora": {},
                                           "data": {"jsonl": str(tmp_path / "prefs" / "prefs.jsonl")}}]})
    stage = recipe.stages[0]
    (batch,), _ = StageBatches(stage, preference_example(tiny.processor, stage), RecordSource(stage.data), 0,
                               seed=0).step_batches(0)
    assert batch.samples == 3 and batch.chat.pixel_values is not None


def test_world_preferences_command(tiny_dir, tmp_path, capsys):
    from tinyomni.cli import main

    out = tmp_path / "prefs.jsonl"
    assert main(["world", "preferences", "--model", tiny_dir, "--out", str(out), "--skills", "color",
                 "--split", "val", "--n", "2", "--max-new-tokens", "3"]) == 0
    # The tiny random model answers only whitespace: nothing to prefer against, so no pairs.
    assert out.is_file() and out.read_text() == ""
    assert "wrote 0 pairs" in capsys.readouterr().out
