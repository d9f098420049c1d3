"""Fine-tuning an imported model: a tiny transformers InternVL directory, LoRA-tuned by
recipes/toy-import.toml on LLaVA-format records, saved as a small checkpoint that names its base
(`base_model`) and reloads on top of it to the very logits the trained model gave in memory.

The InternVL directory is built as tests/test_interop_internvl.py builds them (random weights, a
tokenizer trained on a few sentences); nothing comes from a hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import tinyomni
from tinyomni.errors import CheckpointError, InputError
from tinyomni.model.lora import LoRALinear
from tinyomni.train import load_recipe
from tinyomni.train.data import llava_messages, read_llava
from tinyomni.train.trainer import Trainer, init_distributed

pytest.importorskip("transformers")
from test_interop_internvl import build  # noqa: E402  (after the skip: it imports transformers)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "toy-import.toml"
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("internvl") / "tiny-internvl"
    build(path, text="qwen2", heads=(3, 1), tied=True)
    return path


def write_llava(root: Path) -> tuple[Path, Path]:
    """Eight LLaVA records (a JSON list) about solid-colour pictures, in an image folder of their own."""
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        file = f"{name}-{i}.png"
        Image.new("RGB", (40 + 8 * i, 40), rgb).save(images / file)
        records.append({"id": f"c{i}", "image": file, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": name}]})
    data = root / "llava.json"
    data.write_text(json.dumps(records))
    return data, images


def logits(model: tinyomni.Model, image: Path) -> torch.Tensor:
    prompt = model.prepare([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                         {"type": "text", "text": "What colour is the picture?"}]}],
                           max_tiles=1)
    with torch.no_grad():
        out, _ = model.model(torch.tensor([prompt.input_ids]), prompt.pixel_values)
    return out.float()


def test_llava_records_become_chat_messages(tmp_path):
    root = tmp_path / "imgs"
    record = {"id": "x", "image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nLeft. <image>\nRight: which is bigger?"},
        {"from": "gpt", "value": "the left one"},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}
    messages = llava_messages(record, root)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [
        {"type": "image", "image": str(root / "a.jpg")}, {"type": "text", "text": "Left."},
        {"type": "image", "image": str(root / "b.jpg")}, {"type": "text", "text": "Right: which is bigger?"}]
    assert messages[1] == {"role": "assistant", "content": "the left one"}
    # No <image> mark: the image goes before the first question, as LLaVA does.
    plain = llava_messages({"image": "a.jpg", "conversations": [{"from": "human", "value": "Q?"},
                                                               {"from": "gpt", "value": "A"}]}, root)
    assert plain[0]["content"][0] == {"type": "image", "image": str(root / "a.jpg")}
    with pytest.raises(InputError, match="1 <image> mark"):
        llava_messages({"id": "y", "image": ["a.jpg", "b.jpg"], "conversations": [
            {"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "a"}]}, root)
    with pytest.raises(InputError, match="from"):
        llava_messages({"conversations": [{"from": "robot", "value": "hi"}]}, root)
    # JSONL works as well as a JSON list.
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    assert len(read_llava(tmp_path / "d.jsonl")) == 2


def test_lora_fine_tune_of_an_imported_internvl_saves_a_small_adapter(base_dir, tmp_path):
    data, images = write_llava(tmp_path / "data")
    recipe = load_recipe(RECIPE, [f'model.from="{base_dir}"', f'run.out="{tmp_path / "run"}"',
                                  f'stages.0.data.llava="{data}"', f'stages.0.data.image_folder="{images}"'])
    trainer = Trainer(recipe, init_distributed(None), progress=False)
    result = trainer.run(resume=False, stop_after=None)
    losses = result.losses
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses

    ckpt = result.model_dir
    config = json.loads((ckpt / "config.json").read_text())
    assert config["base_model"] == str(base_dir.resolve()) and config["base_decoder"] is None
    # Only what training changed: the projector (trained in full) and the LoRA adapter, no base weights.
    from safetensors.torch import load_file

    stored = load_file(str(ckpt / "model.safetensors"))
    assert stored and all(k.startswith("multi_modal_projector.") for k in stored), sorted(stored)
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    ours = (ckpt / "model.safetensors").stat().st_size + (ckpt / "adapter_model.safetensors").stat().st_size
    assert ours < 0.25 * base_bytes, (ours, base_bytes)

    # Reloaded on top of its base, it computes what the trained model computed in memory.
    image = images / "red-0.png"
    trained = logits(trainer.model.to(dtype=torch.float32), image)
    loaded = tinyomni.load(ckpt)
    assert not any(isinstance(m, LoRALinear) for m in loaded.model.modules())  # merged at load
    assert torch.allclose(loaded_logits := logits(loaded, image), trained, atol=1e-4), \
        (loaded_logits - trained).abs().max()
    assert not torch.allclose(logits(tinyomni.load(base_dir), image), trained, atol=1e-3)  # it did change

    # Saving the loaded model again stores the same small difference (still relative to the base).
    again = loaded.save(tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["base_model"] == str(base_dir.resolve())
    assert set(load_file(str(again / "model.safetensors"))) >= set(stored)
    assert (again / "model.safetensors").stat().st_size < 0.5 * base_bytes
    assert torch.allclose(logits(tinyomni.load(again), image), trained, atol=1e-4)

    # A relative base_model is found beside the checkpoint: a checkpoint shipped next to its base.
    shipped = tmp_path / "shipped"
    shutil.copytree(base_dir, shipped / "base")
    shutil.copytree(ckpt, shipped / "tuned")
    config["base_model"] = "../base"
    (shipped / "tuned" / "config.json").write_text(json.dumps(config))
    assert torch.allclose(logits(tinyomni.load(shipped / "tuned"), image), trained, atol=1e-4)

    # A missing base is an error naming it.
    shutil.rmtree(shipped / "base")
    with pytest.raises(CheckpointError, match=r"base model '\.\./base'"):
        tinyomni.load(shipped / "tuned")


def test_adapter_checkpoint_goes_through_the_load_cache(base_dir, tmp_path, monkeypatch):
    # A fine-tuned checkpoint is built (base import + adapter merge) once, then read from the cache;
    # changing the base changes the key.
    from tinyomni import api

    monkeypatch.setenv("TINYOMNI_CACHE", str(tmp_path / "cache"))
    model = tinyomni.load(base_dir)
    model.config.base_model = str(base_dir)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias.add_(0.5)  # a "trained" change
    ckpt = model.save(tmp_path / "tuned")
    stored = json.loads((ckpt / "config.json").read_text())
    assert stored["base_model"] == str(base_dir)
    calls = []
    real = api._load_native
    monkeypatch.setattr(api, "_load_native", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = tinyomni.load(ckpt)
    second = tinyomni.load(ckpt)
    assert calls.count(ckpt) == 1  # the second load read the cache entry
    image = tmp_path / "img.png"
    Image.new("RGB", (56, 56), (10, 200, 90)).save(image)
    assert torch.equal(logits(first, image), logits(second, image))
    assert second.config.base_model == str(base_dir)  # saving the cached model stays relative
