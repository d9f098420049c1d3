"""Retrieval with dual encoders: CLIP / SigLIP parity with transformers on tiny random models, a
tinyomni model's contrastive towers (from a training checkpoint, saved and read back), `tinyomni
embed`, and the world-retrieval metrics.

Nothing comes from a hub: the CLIP tokenizer is built here from a byte-level vocabulary, SigLIP's is a
word-level tokenizer.json (SigLIP's own SentencePiece model needs a library tinyomni does not use).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyomni import retrieval
from tinyomni.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")

TILE, PATCH = 28, 14
TEXTS = ["A red circle.", "a big RED circle and a small blue star!", "circle", "stars stars stars stars stars"]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [noise_image(40, 30, 0), noise_image(28, 28, 1), noise_image(17, 50, 2)]


def clip_tokenizer(path: Path):
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(path)
    return tok


def siglip_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "big", "and", "small", "blue", "star", "stars"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return backend


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip")
    tok = clip_tokenizer(path)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH),
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms and scale, so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.logit_scale.fill_(1.7)
    model.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}
                                    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("siglip")
    siglip_tokenizer(path)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=12, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=10, pad_token_id=0, eos_token_id=1,
                         projection_size=32),  # the text head maps to the vision width
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH))
    torch.manual_seed(1)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.logit_scale.fill_(1.2)
        model.logit_bias.fill_(-0.7)
    model.save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": TILE, "width": TILE}).save_pretrained(path)
    return path


def _reference(path: Path, kind: str):
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    processor = (transformers.CLIPImageProcessor if kind == "clip" else transformers.SiglipImageProcessor
                 ).from_pretrained(path)
    return cls.from_pretrained(path).eval(), processor


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_embed_as_transformers(kind: str, clip_dir: Path, siglip_dir: Path) -> None:
    path = clip_dir if kind == "clip" else siglip_dir
    ours = retrieval.load(path)
    theirs, processor = _reference(path, kind)
    pixels = processor(images=IMAGES, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours._spaces["image"].prepare_media(IMAGES)[0], pixels)  # same pixels, every size
    if kind == "clip":
        tok = transformers.AutoTokenizer.from_pretrained(path)
        batch = tok(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
        ids, mask = ours._spaces["image"].prepare_text(TEXTS)
        assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"].bool())
        text_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    else:  # padded to the text model's length, no mask: as SigLIP was trained
        (ids,) = ours._spaces["image"].prepare_text(TEXTS)
        assert ids.shape == (len(TEXTS), 10)
        assert ids[0].tolist() == [3, 4, 5, 2, 1, 0, 0, 0, 0, 0]  # "a red circle <unk: .> </s>", then padding
        text_inputs = {"input_ids": ids}
    with torch.no_grad():
        out = theirs(pixel_values=pixels, **text_inputs)
    image = ours.embed(image=IMAGES)
    text = ours.embed(text=TEXTS)
    reference_image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    reference_text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    assert (image - reference_image).abs().max() <= 1e-4
    assert (text - reference_text).abs().max() <= 1e-4
    assert torch.allclose(ours.logits(image, text), out.logits_per_image, atol=1e-4)
    assert torch.allclose(image.norm(dim=-1), torch.ones(len(IMAGES)))
    single = ours.embed(text=TEXTS[1])
    assert single.shape == text[1].shape and torch.allclose(single, text[1], atol=1e-5)


def test_dual_encoders_are_refused_as_chat_models_and_bad_input_is_named(clip_dir: Path, siglip_dir: Path,
                                                                          tmp_path: Path, tiny) -> None:
    import shutil

    import tinyomni

    with pytest.raises(CheckpointError, match="dual encoder"):
        tinyomni.load(clip_dir)
    encoder = retrieval.load(clip_dir)
    with pytest.raises(InputError, match="exactly one"):
        encoder.embed(image=IMAGES[0], text="a")
    with pytest.raises(InputError, match="no audio tower"):
        encoder.embed(audio=np.zeros(1600, dtype=np.float32))
    with pytest.raises(InputError, match="empty"):
        encoder.embed(text=[])
    # A SigLIP with only SentencePiece's file: refused by name, not read wrong.
    shutil.copytree(siglip_dir, tmp_path / "sp")
    (tmp_path / "sp" / "tokenizer.json").unlink()
    (tmp_path / "sp" / "spiece.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="spiece.model"):
        retrieval.load(tmp_path / "sp")
    # A tinyomni model without towers.json (the shipped tinyomni-world has them: see below).
    bare = tiny.save(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="keeps no contrastive towers"):
        retrieval.load(bare)


# --- a tinyomni model's contrastive towers ------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    """The toy recipe's contrastive stage (SigLIP loss, tiny model), stopped at its end: 3 steps."""
    from tinyomni.train.recipe import load_recipe
    from tinyomni.train.trainer import train

    out = tmp_path_factory.mktemp("toy")
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes" / "toy.toml", [f'run.out="{out}"', "stages.0.steps=3", "run.save_every=100"])
    train(recipe, stop_after=3, progress=False)
    return out / "checkpoints" / "step-0000003"


def _world_pairs(n: int = 3) -> list[dict]:
    from tinyomni.world.generator import generate, to_record

    return [to_record(s) for s in generate(["caption"], n=n, split="test", difficulty={"image_size": 56})]


def test_contrastive_towers_embed_as_training_did(toy_checkpoint: Path, tmp_path: Path) -> None:
    from tinyomni.retrieval.towers import from_training_checkpoint, save_towers
    from tinyomni.train import checkpoint as ckpt
    from tinyomni.train.contrastive import ContrastiveModule
    from tinyomni.train.data import collate_pairs, pair_example
    from tinyomni.train.recipe import recipe_from_dict
    from tinyomni.train.trainer import build_model

    encoder = retrieval.load(toy_checkpoint)
    records = _world_pairs()
    images = encoder.embed(image=[r["image"] for r in records])
    texts = encoder.embed(text=[r["answers"][0] for r in records])
    # The training module, rebuilt from the same checkpoint, on the batch training makes of these records.
    state = json.loads((toy_checkpoint / "state.json").read_text())
    recipe = recipe_from_dict(state["recipe"])
    stage = recipe.stages[0]
    model = build_model(recipe)
    _, weights, _ = ckpt.load_checkpoint(toy_checkpoint)
    model.model.load_state_dict({k: v for k, v in weights.items() if k.startswith("vision_tower.")}, strict=False)
    module = ContrastiveModule(model.model.vision_tower, model.config.vision.hidden_size, "vision",
                               len(model.tokenizer), stage.text_tower, stage.loss)
    module.load_state_dict({k[len("stage_module."):]: v for k, v in weights.items()
                            if k.startswith("stage_module.")}, strict=False)
    module.eval()
    make = pair_example(model.tokenizer, model.config, stage)
    batch = collate_pairs([make(i, r, None) for i, r in enumerate(records)],
                          model.tokenizer.pad_token_id)
    with torch.no_grad():
        media = module.embed_media(module.pool_media(batch)[0])
        text = module.embed_text(batch)[: len(records)]
    assert torch.allclose(images, media, atol=1e-5) and torch.allclose(texts, text, atol=1e-5)
    logits = encoder.logits(images, texts)
    assert torch.allclose(logits, media @ text.T * module.logit_scale.exp() + module.logit_bias, atol=1e-4)
    # The trainer's own snapshot of the live module (what it keeps at a contrastive stage's end) is the same.
    from tinyomni.retrieval.towers import collect_towers, from_contrastive_module

    snapshot = from_contrastive_module(module, stage, model.config, model.tokenizer)
    save_towers(tmp_path / "run" / "towers" / stage.name, snapshot)
    assert collect_towers(tmp_path / "run" / "towers", tmp_path / "collected") is not None
    assert torch.allclose(retrieval.load(tmp_path / "collected").embed(image=records[0]["image"]), images[0], atol=1e-6)

    # Saved as towers.json beside a model, they come back the same, also through Model.embed.
    import tinyomni

    saved = model.save(tmp_path / "model")
    save_towers(saved, from_training_checkpoint(toy_checkpoint))
    again = tinyomni.load(saved)
    assert torch.allclose(again.embed(text=[r["answers"][0] for r in records]), texts, atol=1e-6)
    assert torch.allclose(again.embed(image=records[0]["image"]), images[0], atol=1e-6)
    with pytest.raises(InputError, match="no audio tower"):
        again.embed(text="a", space="audio")


def test_embed_command_writes_npy_and_jsonl(toy_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from tinyomni import cli
    from tinyomni.cli import main
    from tinyomni.retrieval.cli import HELP

    monkeypatch.setitem(cli.COMMANDS, "embed", ("tinyomni.retrieval.cli", HELP))  # as tinyomni/cli.py lists it

    image = tmp_path / "x.png"
    IMAGES[0].save(image)
    assert main(["embed", "--model", str(toy_checkpoint), "--image", str(image), "--image", str(image),
                 "--out", str(tmp_path / "v.npy")]) == 0
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert main(["embed", "--model", str(toy_checkpoint), "--text", "A small red circle.", "--text", "a"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["input"] for x in lines] == ["A small red circle.", "a"] and len(lines[0]["embedding"]) == 32
    assert main(["embed", "--model", str(toy_checkpoint), "--text", "a", "--out", str(tmp_path / "v.txt")]) == 2
    assert ".npy or .jsonl" in capsys.readouterr().err


# --- world-retrieval -----------------------------------------------------------------------------------
def test_retrieval_ranks_and_scores_by_hand() -> None:
    from tinyomni.eval.runner import retrieval_ranks, retrieval_scores

    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.7], [0.1, 0.3, 0.2]])
    positives = torch.eye(3, dtype=torch.bool)
    assert retrieval_ranks(similarity, positives) == [1, 3, 2]
    positives[1, 0] = True  # a repeated caption: either positive counts, the best-ranked one wins
    assert retrieval_ranks(similarity, positives) == [1, 1, 2]
    scores = retrieval_scores([1, 3, 12, 2], candidates=20)
    assert scores["recall@1"] == 25.0 and scores["recall@5"] == 75.0 and scores["recall@10"] == 75.0
    assert scores["mean_rank"] == 4.5 and scores["median_rank"] == 2.5


def test_world_retrieval_scores_a_dual_encoder(toy_checkpoint: Path, tmp_path: Path) -> None:
    from tinyomni.eval.runner import evaluate_retrieval
    from tinyomni.eval.tasks import world_retrieval_pairs

    pairs = world_retrieval_pairs(12, image_size=56)
    assert len({p.id for p in pairs}) == 12 and all(p.text.endswith(".") for p in pairs)
    assert world_retrieval_pairs(12, image_size=56)[3].text == pairs[3].text  # fixed by its seed
    summary = evaluate_retrieval(retrieval.load(toy_checkpoint), pairs, tmp_path, model_name="toy")
    for direction in ("image_to_text", "text_to_image"):
        t = summary["tasks"][f"world-retrieval/{direction}"]
        assert 0 <= t["recall@1"] <= t["recall@5"] <= t["recall@10"] <= 100.0 and 1 <= t["mean_rank"] <= 12
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 12
    assert "| world-retrieval/image_to_text | 12 |" in (tmp_path / "summary.md").read_text()

    class Oracle:  # an encoder that knows the answer scores 100 with mean rank 1
        def embed(self, image=None, text=None, space="image"):
            keys = [p.text for p in pairs]
            by_image = {id(p.image): keys.index(p.text) for p in pairs}
            rows = [by_image[id(x)] for x in image] if image is not None else [keys.index(t) for t in text]
            return torch.nn.functional.one_hot(torch.tensor(rows), len(pairs)).float()

    perfect = evaluate_retrieval(Oracle(), pairs, tmp_path / "oracle")
    assert all(t["recall@1"] == 100.0 and t["mean_rank"] == 1.0 for t in perfect["tasks"].values())


# --- towers that ship inside a model: LiT (frozen encoder), shared encoder, compact vocabulary ------------
LIT = """
name = "lit"
[model]
from = "{model}"
[run]
autocast = "none"
save_every = 100
log_every = 1
[[stages]]
name = "text-tower"
kind = "contrastive"
lock_encoder = true
steps = 2
batch_size = 4
lr = 3e-3
hard_negatives = 1
text_tower = {{ hidden_size = 32, layers = 1, heads = 2, embed_dim = 32 }}
data = {{ skills = ["caption"], difficulty = {{ image_size = 56 }} }}
"""


def test_locked_encoder_towers_ship_small_inside_the_model(tiny, tmp_path: Path) -> None:
    from safetensors import safe_open

    from tinyomni.retrieval.ship import ship
    from tinyomni.retrieval.towers import TOWERS_WEIGHTS, load_towers, save_towers
    from tinyomni.train.recipe import load_recipe
    from tinyomni.train.trainer import train

    model_dir = tiny.save(tmp_path / "tiny")
    before = {k: v.clone() for k, v in tiny.model.vision_tower.state_dict().items()}
    recipe = tmp_path / "lit.toml"
    recipe.write_text(LIT.format(model=model_dir))
    train(load_recipe(recipe, [f'run.out="{tmp_path / "run"}"']), progress=False)
    full = load_towers(tmp_path / "run" / "model")
    # LiT: the encoder the towers were trained against is the model's, to the bit (BatchNorm statistics too).
    after = full.pairs["vision"].encoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    ship(tmp_path / "run", model_dir, samples=8, check_pairs=4)
    meta = json.loads((model_dir / "towers.json").read_text())["pairs"]["vision"]
    assert meta["encoder"] == "model" and 0 < len(meta["vocabulary"]) < 200
    with safe_open(str(model_dir / TOWERS_WEIGHTS), "pt") as f:
        assert not any(k.startswith("vision.encoder.") for k in f.keys())
        assert f.get_tensor("vision.text_tower.embed.weight").dtype == torch.float16
    shipped, run = retrieval.load(model_dir), retrieval.load(tmp_path / "run" / "model")
    records = _world_pairs(4)
    captions = [r["answers"][0] for r in records]
    assert torch.allclose(shipped.embed(image=[r["image"] for r in records]),
                          run.embed(image=[r["image"] for r in records]), atol=2e-3)
    assert torch.allclose(shipped.embed(text=captions), run.embed(text=captions), atol=2e-3)
    # Tokens outside the vocabulary all read the one last row: two unknown words embed alike.
    known = set(meta["vocabulary"])
    unknown = [w for w in ("zebra", "quartz", "kiwi", "oboe") if all(t not in known for t in
                                                                      shipped.tokenizer.encode_piece(" " + w))]
    assert len(unknown) >= 2
    a, b = (shipped.embed(text=f"A small red {w}.") for w in unknown[:2])
    assert torch.equal(a, b) and not torch.equal(a, shipped.embed(text=captions[0]))
    # Through the loaded chat model too, which does not read the towers until asked.
    import tinyomni

    again = tinyomni.load(model_dir)
    assert getattr(again, "_dual_encoder", None) is None
    assert torch.allclose(again.embed(text=captions), shipped.embed(text=captions), atol=1e-6)

    # An encoder that is not the model's is refused, not shipped beside the wrong tower.
    changed = load_towers(tmp_path / "run" / "model")
    with torch.no_grad():
        next(changed.pairs["vision"].encoder.parameters()).add_(1.0)
    with pytest.raises(CheckpointError, match="differs from the pair's encoder"):
        save_towers(model_dir, changed, share_encoder=True)


def test_lock_encoder_is_for_contrastive_stages_only() -> None:
    from tinyomni.errors import ConfigError
    from tinyomni.train.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match="lock_encoder is for contrastive stages"):
        recipe_from_dict({"stages": [{"kind": "sft", "lock_encoder": True, "train": ["multi_modal_projector"]}]})
    with pytest.raises(ConfigError, match="not with lock_encoder"):
        recipe_from_dict({"stages": [{"kind": "contrastive", "lock_encoder": True, "tag_loss": 1.0}]})


def test_the_shipped_model_embeds_and_retrieves_above_chance(tmp_path: Path) -> None:
    """tinyomni-world ships LiT towers (recipes/tinyomni-world-towers.toml) over its own vision tower."""
    from tinyomni.eval.runner import evaluate_retrieval
    from tinyomni.eval.tasks import world_retrieval_pairs

    encoder = retrieval.load("tinyomni-world")
    assert encoder.spaces == ["image"]
    pairs = world_retrieval_pairs(16)
    summary = evaluate_retrieval(encoder, pairs, tmp_path)
    # Chance: R@1 6.25 % of 16 (mean rank 8.5). Measured on these 16: 100 % both ways (on all 500 of
    # world-retrieval: 96.0 / 93.8 %, docs/model_card.md); a 16-pair margin of error is left.
    for t in summary["tasks"].values():
        assert t["recall@1"] >= 75.0 and t["mean_rank"] <= 1.5, summary["tasks"]
