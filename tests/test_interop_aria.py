"""Aria's MoE text decoder (transformers' `AriaTextForCausalLM`) loads with exact parity: tiny random checkpoints
are saved with a byte-level BPE tokenizer, loaded with `tinyomni.load(dir)` (a text decoder: an omni model is
built around it), and compared with transformers on fp32 logits and a 16-token greedy continuation through
tinyomni's generation loop (prefill, then one-token steps on the KV cache). Also: our MoE decoder written back
in Aria's layout loads in transformers with the same logits, and what does not load is named.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from parity import assert_logits_match, assert_same_greedy, relative_error
from test_interop_llava import edit_json, make_tokenizer, randomize

import tinyomni
from tinyomni.checkpoints.aria import save_aria_text
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError
from tinyomni.generate import Generation
from tinyomni.model.moe import MoEDecoder, MoEMLP
from tinyomni.processing.chat import Prompt

transformers = pytest.importorskip("transformers")

TEXT = "The quick brown fox jumps over the lazy dog, and then it counts: one two three"


def build(path: Path, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, experts: int = 4, top_k: int = 2,
          shared: int = 2, tied: bool = False, act: str = "silu", seed: int = 0):
    """A tiny Aria text checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer("qwen2", path)
    config = transformers.AriaTextConfig(
        vocab_size=len(tokenizer) + 16, hidden_size=heads * head_dim, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256,
        moe_num_experts=experts, moe_topk=top_k, moe_num_shared_experts=shared, hidden_act=act,
        tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, architectures=["AriaTextForCausalLM"])
    # The reference loop over experts; the default grouped GEMM needs 16-byte-aligned rows (not 3 x 10 floats).
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AriaTextForCausalLM(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    return model, tokenizer


CASES = {
    # Aria's own shape: top-2 of the experts plus 2 shared experts' width, grouped keys, untied.
    "top2-shared2": dict(heads=4, kv_heads=2, experts=4, top_k=2, shared=2),
    # one expert per token (Switch-style), one shared expert, odd head count (3 query heads per key head), tied
    "top1-shared1-odd-heads": dict(heads=3, kv_heads=1, head_dim=10, experts=3, top_k=1, shared=1, tied=True),
    # no shared experts, 3 of 5 experts per token, GELU on the shared path is unused: plain multi-head attention
    "top3-no-shared": dict(heads=5, kv_heads=5, head_dim=8, experts=5, top_k=3, shared=0),
    # the shared experts' own activation (hidden_act) while the routed experts stay SiLU
    "gelu-shared": dict(heads=4, kv_heads=2, experts=4, top_k=2, shared=1, act="gelu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference, tokenizer = build(tmp_path, **options, seed=len(case))
    assert family_for(tmp_path)[1].name == "decoder"
    ours = tinyomni.load(tmp_path)
    decoder = ours.model.language_model
    assert isinstance(decoder, MoEDecoder)
    config = ours.config.decoder
    assert (config.kind, config.num_experts, config.num_experts_per_tok, config.num_shared_experts) == (
        "moe", options["experts"], options["top_k"], options["shared"])
    assert (decoder.lm_head.weight is decoder.model.embed_tokens.weight) == options.get("tied", False)

    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ours.tokenizer.encode(TEXT) == ids[0].tolist()
    with torch.no_grad():
        logits, _ = ours.model(ids)
        theirs = reference(ids).logits
    vocab = theirs.shape[-1]
    assert logits.shape == theirs.shape
    assert relative_error(logits[..., :vocab], theirs) <= 1e-4

    params = ours.sampling_params(max_new_tokens=16, ignore_eos=True)
    generation = Generation(ours.model, ours.tokenizer, [Prompt(ids[0].tolist())], params, ours.suppress_ids)
    for _ in generation:
        pass
    with torch.no_grad():
        generated = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                       suppress_tokens=ours.suppress_ids, pad_token_id=tokenizer.pad_token_id)
    assert generation.completions[0].token_ids == generated[0, ids.shape[1]:].tolist()
    assert len(generation.completions[0].token_ids) == 16


def test_routing_is_arias(tmp_path: Path) -> None:
    """Each layer picks the same experts with the same weights as transformers' router (top-k of the logits,
    softmax over the chosen), on the same hidden states."""
    reference, _ = build(tmp_path, top_k=2, seed=3)
    ours = tinyomni.load(tmp_path)
    x = torch.randn(2, 7, reference.config.hidden_size)
    for theirs_layer, our_layer in zip(reference.model.layers, ours.model.language_model.model.layers):
        with torch.no_grad():
            _, their_w, their_i = theirs_layer.mlp.router(x.view(-1, x.shape[-1]))
            _, our_w, our_i = our_layer.mlp.route(x.view(-1, x.shape[-1]))
            assert torch.equal(our_i, their_i) and torch.allclose(our_w, their_w, atol=1e-6)
            assert relative_error(our_layer.mlp(x), theirs_layer.mlp(x)) <= 1e-5


def test_batches_and_the_serving_engine_match_single_rows(tmp_path: Path) -> None:
    """Two prompts of different lengths in one batch (left padding, a mask on the cache), and in the serving
    engine, give each row's own greedy continuation: routing is per token, so padding moves no real token's
    experts."""
    build(tmp_path)
    ours = tinyomni.load(tmp_path)
    prompts = [Prompt(ours.tokenizer.encode(t)) for t in (TEXT, "one two three")]
    params = ours.sampling_params(max_new_tokens=8, ignore_eos=True)

    def run(batch: list[Prompt]) -> list[list[int]]:
        generation = Generation(ours.model, ours.tokenizer, batch, params, ours.suppress_ids)
        for _ in generation:
            pass
        return [c.token_ids for c in generation.completions]

    alone = run(prompts[:1]) + run(prompts[1:])
    assert run(prompts) == alone

    # The serving engine: rows of different ages share one cache, each writing its own slots.
    from tinyomni.serve.engine import Engine

    engine = Engine(ours, max_batch=2).start()
    try:
        requests = [engine.submit(p, params) for p in prompts]
        for r in requests:
            "".join(r)
        assert [r.completion.token_ids for r in requests] == alone
    finally:
        engine.close()


def test_our_moe_decoder_written_as_aria_loads_in_transformers(tmp_path: Path) -> None:
    """save_aria_text (experts stacked back into fc1/fc2) → AriaTextForCausalLM.from_pretrained, same logits."""
    build(tmp_path / "src", seed=5)
    decoder = tinyomni.load(tmp_path / "src").model.language_model
    save_aria_text(decoder, tmp_path / "out")
    reference = transformers.AriaTextForCausalLM.from_pretrained(tmp_path / "out",
                                                                  experts_implementation="eager").eval()
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert relative_error(decoder(ids)[0], reference(ids).logits) <= 1e-5


@pytest.fixture(scope="module")
def aria_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aria")
    build(path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(attention_bias=True), "attention_bias=true"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rope type 'dynamic'"),
    (lambda c: c.update(moe_topk=9), "moe_topk 9 of 4 experts"),
])
def test_unsupported_config_values_are_named(change, message: str, aria_dir: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(aria_dir, tmp_path / "ckpt"))
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_a_wrong_expert_tensor_is_named(aria_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = Path(shutil.copytree(aria_dir, tmp_path / "ckpt"))
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.mlp.experts.fc2.weight"] = state["model.layers.1.mlp.experts.fc2.weight"][:3]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.fc2\.weight has shape \(3, "):
        tinyomni.load(path)


def test_experts_are_linears_the_quantizer_swaps(aria_dir: Path) -> None:
    """Every expert projection is a plain nn.Linear (what engine/quantize.py swaps); the router is not."""
    decoder = tinyomni.load(aria_dir).model.language_model
    mlp = decoder.model.layers[0].mlp
    assert isinstance(mlp, MoEMLP) and len(mlp.experts) == 4
    assert all(type(m) is torch.nn.Linear for e in mlp.experts for m in (e.gate_proj, e.up_proj, e.down_proj))
    assert type(mlp.router) is not torch.nn.Linear


# --- the whole Aria (AriaForConditionalGeneration) -----------------------------------------------------------
# An Aria-style template (the shape of the hub's: ChatML turns, each image as <fim_prefix><|img|><fim_suffix>).
ARIA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}"
    "<fim_prefix><|img|><fim_suffix>{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARIA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>", "<|img|>"]
ARIA_CORPUS = ["<|im_start|>user\nWhat is in the picture? Describe the image in detail.<|im_end|>",
               "How many red circles are there? Answer with a number: 1 2 3 4 5 6 7 8 9 0",
               "The quick brown fox jumps over the lazy dog. system user assistant"] * 4


def aria_tokenizer(path: Path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(ARIA_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=ARIA_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                   pad_token="<|endoftext|>",
                                                   extra_special_tokens={"image_token": "<|img|>"})
    wrapped.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def build_aria(path: Path, queries: int = 8, vision_layers: int = 2, feature_layer: int = -1, min_size: int = 100,
               experts: int = 4, top_k: int = 2, shared: int = 1, seed: int = 0):
    """A tiny AriaForConditionalGeneration directory (980-px tiles, 28-px patches: 35 x 35) with its processor
    files; returns (the transformers model, fp32 eval; its processor, PIL backend). AriaProcessor resizes to
    980 px whatever its image processor's max_image_size says (its own images_kwargs default wins)."""
    tokenizer = aria_tokenizer(path)
    text = transformers.AriaTextConfig(
        vocab_size=len(tokenizer) + 4, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, moe_num_experts=experts,
        moe_topk=top_k, moe_num_shared_experts=shared, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id)
    vision = transformers.Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                                               num_attention_heads=2, image_size=980, patch_size=28)
    config = transformers.AriaConfig(text_config=text, vision_config=vision, vision_feature_layer=feature_layer,
                                     projector_patch_to_query_dict={1225: queries, 4900: queries + 4},
                                     image_token_index=tokenizer.convert_tokens_to_ids("<|img|>"))
    config._experts_implementation = "eager"
    config.text_config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AriaForConditionalGeneration(config).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    processor = transformers.AriaProcessor(
        image_processor=transformers.AriaImageProcessorPil(max_image_size=980, min_image_size=min_size),
        tokenizer=tokenizer, chat_template=ARIA_TEMPLATE, size_conversion={490: queries + 4, 980: queries})
    processor.save_pretrained(path)
    return model, processor


def aria_conversation(image, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


ARIA_CASES = {
    # a wide picture: rows of padding, the last image row of patches partly padded (457 px = 16.3 patches)
    "wide-last-layer": (dict(queries=8, feature_layer=-1, min_size=100), (150, 70)),
    # a tall one, raised to min_image_size on its short side; an earlier vision layer; top-1 routing
    "tall-min-size-layer1": (dict(queries=6, vision_layers=3, feature_layer=1, min_size=300, top_k=1), (40, 160)),
    # a square picture: no padding at all (no mask); no shared experts
    "square": (dict(queries=5, min_size=100, shared=0), (64, 64)),
}


@pytest.mark.parametrize("case", list(ARIA_CASES))
def test_whole_aria_matches_transformers(case: str, tmp_path: Path) -> None:
    from test_interop_llava import noise_image

    from tinyomni.model.aria_projector import AriaProjector

    options, size = ARIA_CASES[case]
    reference, processor = build_aria(tmp_path, **options, seed=len(case))
    assert family_for(tmp_path)[1].name == "aria"
    ours = tinyomni.load(tmp_path)
    assert isinstance(ours.model.multi_modal_projector, AriaProjector)
    assert isinstance(ours.model.language_model, MoEDecoder)
    assert ours.config.image_tokens_per_tile == options["queries"]

    messages = aria_conversation(noise_image(*size, seed=3))
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    theirs_pixels, mask = inputs["pixel_values"], inputs["pixel_mask"].bool()
    assert prompt.pixel_values.shape == theirs_pixels.shape
    image = ~torch.isnan(prompt.pixel_values).any(dim=1)
    assert torch.equal(image, mask)  # the padding where theirs is
    assert torch.equal(prompt.pixel_values[image[:, None].expand_as(theirs_pixels)], theirs_pixels[
        mask[:, None].expand_as(theirs_pixels)])

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits[..., :theirs.shape[-1]], theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])


@pytest.fixture(scope="module")
def whole_aria(tmp_path_factory):
    path = tmp_path_factory.mktemp("aria-whole")
    return path, *build_aria(path)


@pytest.fixture(scope="module")
def whole_aria_dir(whole_aria) -> Path:
    return whole_aria[0]


def test_two_images_of_different_shapes_in_one_prompt(whole_aria) -> None:
    """Each image its own tile, padding and mask (one wide, one tall), in the order the template writes them."""
    from test_interop_llava import noise_image

    path, reference, processor = whole_aria
    ours = tinyomni.load(path)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": noise_image(150, 70, seed=1)}, {"type": "text", "text": "and"},
        {"type": "image", "image": noise_image(50, 130, seed=2)}, {"type": "text", "text": "How many?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(~torch.isnan(prompt.pixel_values).any(dim=1), inputs["pixel_mask"].bool())
    with torch.no_grad():
        logits, _ = ours.model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits[..., :theirs.shape[-1]], theirs)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["vision_config"].update(image_size=490, patch_size=14), "image_size 490 .*980-px tiles"),
    (lambda c: c.update(vision_feature_layer=[-1, -2]), r"vision_feature_layer \[-1, -2\]"),
    (lambda c: c.update(projector_patch_to_query_dict={"4900": 8}), "no entry for the tower's 1225 patches"),
    (lambda c: c["text_config"].update(mlp_bias=True), "mlp_bias=true"),
])
def test_unsupported_whole_aria_values_are_named(change, message: str, whole_aria_dir: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(whole_aria_dir, tmp_path / "ckpt"))
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_a_missing_projector_tensor_is_named(whole_aria_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = Path(shutil.copytree(whole_aria_dir, tmp_path / "ckpt"))
    state = load_file(str(path / "model.safetensors"))
    state.pop("multi_modal_projector.cross_attn.layer_norm_kv.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.cross_attn\.layer_norm_kv\.weight"):
        tinyomni.load(path)
