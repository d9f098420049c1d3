"""OpenGVLab's original InternVL layout (`InternVLChatModel`) with its two other decoders, InternLM2 and
Phi-3, loads with exact parity.

- Phi-3: transformers has the class, so the reference is a tiny random transformers InternVL whose text
  model is a `Phi3ForCausalLM` (LongRoPE included), written out in the original layout (whose Phi-3 names
  are transformers'), with its llm_config as the hub's InternVL2-4B spells it ("su", flat rope_theta).
- InternLM2 has no transformers class (remote code): the reference is a tiny transformers InternVL with a
  Llama decoder of the same numbers, written out in InternLM2's names with its grouped `wqkv`, fused here
  independently of the importer's split.
Both then: the same input ids and pixels as transformers' processor, fp32 logits within 1e-4, the same
16-token greedy continuation. Also: LongRoPE's tables against transformers' on both sides of the switch, a
standalone Phi-3 decoder, InternLM2's sentencepiece tokenizer.model (no tokenizer.json) against
transformers' slow sentencepiece tokenizer and sentencepiece itself, save/load round trips, and the errors
for what we do not run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import test_interop_internvl as base
import torch
from parity import assert_logits_match, assert_same_greedy
from safetensors.torch import load_file, save_file

import tinyomni
from tinyomni.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")

HEAD_DIM = 16


def build(path: Path, text_config, tied: bool, seed: int, tokenizer=None):
    """A tiny saved InternVL-hf directory around `text_config` (as base.build does for Qwen2 / Llama)."""
    tokenizer = tokenizer or base.make_tokenizer("llama")
    vision_config = transformers.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=base.TILE,
        patch_size=14, attention_bias=True)
    config = transformers.InternVLConfig(
        vision_config=vision_config, text_config=text_config, downsample_ratio=0.5,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=base.TOKENS_PER_TILE,
        vision_feature_layer=-1, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    base.randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(base.TEMPLATE)
    base.image_processor().save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_seq_length": base.TOKENS_PER_TILE,
                                                            "processor_class": "InternVLProcessor"}))
    return model


def text_numbers(heads: tuple[int, int], tied: bool, vocab: int) -> dict:
    n_heads, n_kv = heads
    return dict(vocab_size=vocab, hidden_size=n_heads * HEAD_DIM, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=4, pad_token_id=2)


def vocab_size() -> int:
    return len(base.make_tokenizer("llama")) + 7


def check_parity(hf_dir: Path, original: Path, reference, processor=None) -> tinyomni.Model:
    """Our load of `original` against transformers' `reference` (the -hf twin) on one image + prompt."""
    ours = tinyomni.load(original)
    messages = base.conversation(base.noise_image(150, 70, seed=3))  # 2x1 tiles + thumbnail
    processor = processor or base.reference_processor(hf_dir, base.image_processor())
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])
    return ours


def edit_llm_config(path: Path, change) -> None:
    data = json.loads((path / "config.json").read_text())
    change(data["llm_config"])
    (path / "config.json").write_text(json.dumps(data, indent=2))


# --- Phi-3 ---------------------------------------------------------------------------------------------
def phi3_text(heads: tuple[int, int], tied: bool, rope: str | None, original_max: int = 32,
              sliding_window: int | None = None):
    half = HEAD_DIM // 2
    scaling = None
    if rope == "longrope":
        # Factors far from 1 and different per channel, so a wrong table (or the wrong one of the two) shows.
        scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(half)],
                   "long_factor": [2.0 + 1.5 * i for i in range(half)]}
    return transformers.Phi3Config(**text_numbers(heads, tied, vocab_size()), rope_theta=10000.0,
                                   original_max_position_embeddings=original_max, rope_scaling=scaling,
                                   sliding_window=sliding_window)


def hub_style_phi3(llm: dict) -> None:
    """llm_config as InternVL2-4B's config.json has it (transformers 4 era): rope_scaling type "su", a flat
    rope_theta and original_max_position_embeddings, no rope_parameters."""
    rope = llm.pop("rope_parameters")
    llm["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] == "longrope":
        llm["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    else:
        llm["rope_scaling"] = None


PHI3_CASES = {
    # LongRoPE, a prompt past original_max_position_embeddings (long factors), 3 heads over 1, untied, hub config.
    "longrope-long-prompt": dict(heads=(3, 1), tied=False, rope="longrope", original_max=24, hub=True),
    # LongRoPE switching during the greedy run: the prompt's keys stay short-factor ones (as transformers'
    # InternVL generate and the original code keep them; see docs/models.md), 2 heads over 1.
    "longrope-crossing": dict(heads=(2, 1), tied=False, rope="longrope", original_max=40, hub=False),
    # LongRoPE below the switch (short factors, attention factor from 256 / 128), odd 5 over 5 heads, tied.
    "longrope-short-prompt": dict(heads=(5, 5), tied=True, rope="longrope", original_max=128, hub=False),
    # Plain RoPE, 4 heads over 2, untied, a sliding window longer than any prompt here (context capped at it).
    "default-window": dict(heads=(4, 2), tied=False, rope=None, sliding_window=200, hub=True),
}


def phi3_original(tmp_path: Path, case: str, seed: int = 11):
    options = dict(PHI3_CASES[case])
    hub = options.pop("hub")
    text = phi3_text(**options)
    reference = build(tmp_path / "hf", text, options["tied"], seed)
    base.write_original_layout(tmp_path / "hf", tmp_path / "original", "llama")

    def to_phi3(llm: dict) -> None:
        llm["architectures"] = ["Phi3ForCausalLM"]
        if hub:
            hub_style_phi3(llm)

    edit_llm_config(tmp_path / "original", to_phi3)
    return reference


@pytest.mark.parametrize("case", list(PHI3_CASES))
def test_phi3_in_the_original_layout_matches_transformers(case: str, tmp_path: Path) -> None:
    reference = phi3_original(tmp_path, case)
    ours = check_parity(tmp_path / "hf", tmp_path / "original", reference)
    decoder = ours.config.decoder
    options = PHI3_CASES[case]
    assert decoder.tie_word_embeddings == options["tied"]
    assert decoder.num_key_value_heads == options["heads"][1]
    prompt_len = len(ours.prepare(base.conversation(base.noise_image(150, 70, seed=3))).input_ids)
    if options["rope"] == "longrope":
        scaling = decoder.rope_scaling
        assert scaling["rope_type"] == "longrope"
        original = options["original_max"]
        factor = 256 / original
        assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(factor) / math.log(original)))
        # Each case sits where it says, relative to the switch.
        if case == "longrope-long-prompt":
            assert prompt_len > original
        elif case == "longrope-crossing":
            assert prompt_len < original < prompt_len + 16
        else:
            assert prompt_len + 16 <= original
    if options.get("sliding_window"):
        assert decoder.max_position_embeddings == options["sliding_window"]


def test_longrope_tables_switch_per_row_at_the_original_length(tmp_path: Path) -> None:
    """Our rope tables against transformers' Phi-3 rotary embedding on both sides of the switch, one row
    of a batch past it and one not (each row as transformers computes it alone)."""
    from tinyomni.checkpoints.hf_phi3 import phi3_decoder_config
    from tinyomni.model.decoder import RotaryEmbedding

    text = phi3_text((3, 1), tied=False, rope="longrope", original_max=32)
    ours = RotaryEmbedding(phi3_decoder_config(text.to_dict()))
    theirs = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(text)
    # Largest positions 19 and 31 (short: the sequence is at most 32 long), 32 and 49 (long).
    rows = [torch.arange(0, 20), torch.arange(12, 32), torch.arange(13, 33), torch.arange(30, 50)]
    cos, sin = ours(torch.stack(rows), torch.float32)
    for i, row in enumerate(rows):
        ref_cos, ref_sin = theirs(torch.zeros(1), row[None])
        torch.testing.assert_close(cos[i, 0], ref_cos[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sin[i, 0], ref_sin[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.cos[10], ours.cos_long[10], atol=1e-2)  # the two tables do differ


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(partial_rotary_factor=0.75), "partial_rotary_factor 0.75"),
    (lambda c: c.update(rope_scaling={"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}),
     "rope_scaling type 'yarn'"),
    (lambda c: c["rope_scaling"].update(short_factor=[1.0] * 3), "short_factor must be a list of 8 numbers"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_phi3_values_are_named(tmp_path: Path, change, message: str) -> None:
    phi3_original(tmp_path, "longrope-long-prompt")
    edit_llm_config(tmp_path / "original", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(tmp_path / "original")


def test_a_missing_fused_phi3_tensor_is_named_as_the_checkpoint_names_it(tmp_path: Path) -> None:
    phi3_original(tmp_path, "default-window")
    base.edit_weights(tmp_path / "original", lambda s: s.pop("language_model.model.layers.1.mlp.gate_up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) language_model\.model\.layers\.1\.mlp\.gate_up_proj"):
        tinyomni.load(tmp_path / "original")


def test_exports_refuse_longrope_and_dynamic_rope_by_name(tmp_path: Path) -> None:
    from tinyomni.checkpoints.export_gguf import export_gguf
    from tinyomni.checkpoints.export_hf import export_hf

    phi3_original(tmp_path, "longrope-long-prompt")
    model = tinyomni.load(tmp_path / "original")
    with pytest.raises((CheckpointError, InputError), match="longrope"):
        export_hf(model, tmp_path / "out-hf")
    with pytest.raises((CheckpointError, InputError), match="longrope"):
        export_gguf(model, tmp_path / "out.gguf")
    assert not (tmp_path / "out-hf").exists() or not any((tmp_path / "out-hf").iterdir())
    internlm2_original(tmp_path / "internlm2", "dynamic-gqa")  # dynamic NTK: no exported format says it
    model = tinyomni.load(tmp_path / "internlm2" / "original")
    with pytest.raises((CheckpointError, InputError), match="dynamic"):
        export_hf(model, tmp_path / "out-hf-2")
    with pytest.raises((CheckpointError, InputError), match="dynamic"):
        export_gguf(model, tmp_path / "out-2.gguf")


# --- InternLM2 -----------------------------------------------------------------------------------------
def internlm2_weights(state: dict[str, torch.Tensor], heads: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Llama names under language_model.* → InternLM2's, q/k/v fused per key/value head group: for each
    kv head, its query heads, then its key head, then its value head (InternLM2's wqkv rows)."""
    n_heads, n_kv = heads
    groups = n_heads // n_kv
    renames = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
               "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    out = {}
    for key, tensor in state.items():
        if not key.startswith("language_model."):
            out[key] = tensor
            continue
        if key == "language_model.lm_head.weight":
            out["language_model.output.weight"] = tensor
            continue
        if key == "language_model.model.embed_tokens.weight":
            out["language_model.model.tok_embeddings.weight"] = tensor
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        if ".self_attn.q_proj." in key:
            stem = key[: -len("q_proj.weight")]
            q, k, v = (state[f"{stem}{p}_proj.weight"] for p in "qkv")
            rows = []
            for h in range(n_kv):
                rows += [q[(h * groups + g) * HEAD_DIM:(h * groups + g + 1) * HEAD_DIM] for g in range(groups)]
                rows += [k[h * HEAD_DIM:(h + 1) * HEAD_DIM], v[h * HEAD_DIM:(h + 1) * HEAD_DIM]]
            out[stem.replace(".self_attn.", ".attention.") + "wqkv.weight"] = torch.cat(rows)
            continue
        for ours, theirs in renames.items():
            if f".{ours}." in key:
                key = key.replace(f".{ours}.", f".{theirs}.")
                break
        out[key] = tensor
    return out


INTERNLM2_CASES = {
    # Dynamic NTK (as internlm2-chat-1_8b: a no-op inside the context), 6 heads over 2 (3 per group), untied.
    "dynamic-gqa": dict(heads=(6, 2), tied=False, rope={"type": "dynamic", "factor": 2.0}),
    # Linear scaling, 3 heads over 3 (one query per group), tied.
    "linear-mha-tied": dict(heads=(3, 3), tied=True, rope={"type": "linear", "factor": 2.0}),
    # Plain RoPE, 4 heads over 1 key/value head.
    "default-mqa": dict(heads=(4, 1), tied=False, rope=None),
}


def internlm2_original(tmp_path: Path, case: str, seed: int = 6, tokenizer=None):
    options = INTERNLM2_CASES[case]
    rope = options["rope"]
    scaling = None if rope is None else {"rope_type": rope["type"], "factor": rope["factor"]}
    numbers = text_numbers(options["heads"], options["tied"], len(tokenizer) + 7 if tokenizer else vocab_size())
    text = transformers.LlamaConfig(**numbers, rope_theta=50000.0, head_dim=HEAD_DIM, rope_scaling=scaling)
    reference = build(tmp_path / "hf", text, options["tied"], seed, tokenizer)
    original = tmp_path / "original"
    base.write_original_layout(tmp_path / "hf", original, "llama")
    state = load_file(str(original / "model.safetensors"))
    save_file(internlm2_weights(state, options["heads"]), str(original / "model.safetensors"),
              metadata={"format": "pt"})
    llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
           "hidden_act": "silu", "rope_theta": 50000.0, "rope_scaling": rope, "attn_implementation": "eager",
           **{k: v for k, v in numbers.items()}}
    edit_llm_config(original, lambda c: (c.clear(), c.update(llm)))
    return reference


@pytest.mark.parametrize("case", list(INTERNLM2_CASES))
def test_internlm2_in_the_original_layout_matches_the_same_llama(case: str, tmp_path: Path) -> None:
    reference = internlm2_original(tmp_path, case)
    ours = check_parity(tmp_path / "hf", tmp_path / "original", reference)
    options = INTERNLM2_CASES[case]
    assert ours.config.decoder.tie_word_embeddings == options["tied"]
    assert ours.config.decoder.num_key_value_heads == options["heads"][1]
    kind = (options["rope"] or {}).get("type")
    assert (ours.config.decoder.rope_scaling or {}).get("rope_type") == kind


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(bias=True), "bias true"),
    (lambda c: c.pop("bias"), "bias true"),  # InternLM2Config's default is True
    (lambda c: c.update(rope_pos_id_version="v2pe"), "rope_pos_id_version 'v2pe'"),
    (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
])
def test_unsupported_internlm2_values_are_named(tmp_path: Path, change, message: str) -> None:
    internlm2_original(tmp_path, "default-mqa")
    edit_llm_config(tmp_path / "original", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(tmp_path / "original")


def test_a_missing_wqkv_is_named_as_the_checkpoint_names_it(tmp_path: Path) -> None:
    internlm2_original(tmp_path, "default-mqa")
    base.edit_weights(tmp_path / "original", lambda s: s.pop("language_model.model.layers.0.attention.wqkv.weight"))
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) language_model\.model\.layers\.0\.attention\.wqkv"):
        tinyomni.load(tmp_path / "original")


def test_a_wqkv_of_the_wrong_size_is_named(tmp_path: Path) -> None:
    internlm2_original(tmp_path, "dynamic-gqa")
    key = "language_model.model.layers.1.attention.wqkv.weight"
    base.edit_weights(tmp_path / "original", lambda s: s.update({key: s[key][:-HEAD_DIM]}))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wqkv\.weight has 144 rows, the config says 160"):
        tinyomni.load(tmp_path / "original")


# --- InternLM2's tokenizer: a sentencepiece tokenizer.model, no tokenizer.json ---------------------------
SP_CORPUS = base.CORPUS + ["  two  spaces\tand a tab\n\nnew lines", "naïve café: 1234 + 5678 = 6912"]
SP_USER_DEFINED = ["<|im_start|>", "<|im_end|>"]  # pieces of the sentencepiece model itself, as InternLM2's
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>"]  # added after it, as InternVL does
CHATS = [
    [{"role": "user", "content": "What is in the picture?"}],
    [{"role": "system", "content": "  Answer  with a number."},
     {"role": "user", "content": "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHow many red circles are there?"},
     {"role": "assistant", "content": "3"}, {"role": "user", "content": "And blue ones? 12 or 345?"}],
    [{"role": "user", "content": " leading and trailing \t\n"}, {"role": "assistant", "content": "café 中文 🙂"},
     {"role": "user", "content": "Zebra QXJ <|im_end|> typed"}],
]
SP_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
               "message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_sentencepiece_files(path: Path, model_type: str = "bpe") -> None:
    """tokenizer.model + tokenizer_config.json (+ generation_config.json) as InternVL2-2B ships them."""
    import io

    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=model, vocab_size=420, model_type=model_type,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, user_defined_symbols=SP_USER_DEFINED, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    pieces = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size()
    listed = ["<unk>", "<s>", "</s>", *SP_USER_DEFINED]
    decoder = {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False}
               for i, t in enumerate(listed)}
    decoder.update({str(pieces + k): {"content": t, "special": True, "normalized": False}
                    for k, t in enumerate(INTERNVL_TOKENS)})
    meta = {"added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
            "unk_token": "<unk>", "tokenizer_class": "InternLM2Tokenizer", "chat_template": SP_TEMPLATE,
            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}
    (path / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))


def reference_sp_tokenizer(path: Path):
    """InternLM2's remote InternLM2Tokenizer in transformers' own slow machinery: the text split at added
    tokens, each piece to sentencepiece (legacy: each gets the dummy prefix), BOS first."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class InternLM2Like(SentencePieceBackend):
        def build_inputs_with_special_tokens(self, ids, pair=None):
            return [self.bos_token_id, *ids, *(pair or [])]

    tokenizer = InternLM2Like(vocab_file=str(path / "tokenizer.model"), unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", pad_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": SP_USER_DEFINED + INTERNVL_TOKENS})
    for name, token in (("start_image_token", "<img>"), ("end_image_token", "</img>"),
                        ("context_image_token", "<IMG_CONTEXT>")):  # what InternVLProcessor reads
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    tokenizer.video_token = "<video>"
    tokenizer.chat_template = SP_TEMPLATE
    return tokenizer


def test_a_sentencepiece_model_encodes_and_decodes_as_its_reference(tmp_path: Path) -> None:
    """Chat-template output through our converted tokenizer.model = the slow reference's ids; random text =
    sentencepiece's own ids and decoded text (the merges, byte fallback and dummy prefix all in play)."""
    import random

    import sentencepiece as spm

    from tinyomni.processing.tokenizer import Tokenizer

    write_sentencepiece_files(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    reference = reference_sp_tokenizer(tmp_path)
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_ids == [4, 2]
    assert len(ours) == len(reference)
    assert [ours.token_to_id(t) for t in INTERNVL_TOKENS] == reference.convert_tokens_to_ids(INTERNVL_TOKENS)
    for messages in CHATS:
        text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.encode(text.removeprefix("<s>")) == reference(text.removeprefix("<s>"))["input_ids"]
        assert ours.encode(text.removeprefix("<s>"))[:1] == [1]

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    rng = random.Random(0)
    words = " ".join(SP_CORPUS).split() + ["é", "中", "🙂", "\n", "\t", "  ", "QXZ"]
    for _ in range(300):
        parts = [rng.choice(words)[: rng.randint(1, 9)] for _ in range(rng.randint(1, 9))]
        text = rng.choice(["", " ", "  "]).join(parts)
        ids = sp.encode(text)
        assert ours.encode_piece(text) == ids, text
        assert ours.decode(ids) == sp.decode(ids), text


def test_internlm2_with_only_a_tokenizer_model_matches_end_to_end(tmp_path: Path) -> None:
    """InternVL2-2B's files: InternLM2 weights, tokenizer.model + tokenizer_config.json, no tokenizer.json."""
    write_sentencepiece_files(tmp_path / "spm")
    tokenizer = reference_sp_tokenizer(tmp_path / "spm")
    reference = internlm2_original(tmp_path, "dynamic-gqa", tokenizer=tokenizer)
    original = tmp_path / "original"
    (original / "tokenizer.json").unlink(missing_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        (original / name).write_bytes((tmp_path / "spm" / name).read_bytes())
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    # As base.reference_processor: only the absent video processor's class check is skipped.
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None else check(self, name, arg))
    try:
        processor = transformers.InternVLProcessor(image_processor=base.image_processor(), tokenizer=tokenizer,
                                                   video_processor=None, chat_template=base.TEMPLATE,
                                                   image_seq_length=base.TOKENS_PER_TILE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    ours = check_parity(tmp_path / "hf", original, reference, processor)
    assert not (original / "tokenizer.json").exists() and ours.tokenizer.add_bos_token


def test_tokenizer_files_we_cannot_read_exactly_are_named(tmp_path: Path) -> None:
    from tinyomni.processing.tokenizer import Tokenizer

    (tmp_path / "none").mkdir()
    with pytest.raises(CheckpointError, match="tokenizer.json .and no sentencepiece tokenizer.model"):
        Tokenizer.from_dir(tmp_path / "none")
    write_sentencepiece_files(tmp_path / "unigram", model_type="unigram")
    with pytest.raises(CheckpointError, match="model_type unigram"):
        Tokenizer.from_dir(tmp_path / "unigram")
    write_sentencepiece_files(tmp_path / "gap")
    meta = json.loads((tmp_path / "gap" / "tokenizer_config.json").read_text())
    meta["added_tokens_decoder"]["999"] = {"content": "<far>", "special": True}
    (tmp_path / "gap" / "tokenizer_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'<far>' is id 999"):
        Tokenizer.from_dir(tmp_path / "gap")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(CheckpointError, match="not a readable sentencepiece model"):
        Tokenizer.from_dir(tmp_path / "bad")


def test_an_unknown_original_layout_decoder_is_refused_with_the_supported_ones(tmp_path: Path) -> None:
    phi3_original(tmp_path, "default-window")
    edit_llm_config(tmp_path / "original", lambda c: c.update(architectures=["Gemma2ForCausalLM"]))
    with pytest.raises(CheckpointError, match="'Gemma2ForCausalLM' language model is not supported .supported: "
                       "Qwen2ForCausalLM, LlamaForCausalLM, InternLM2ForCausalLM, Phi3ForCausalLM"):
        tinyomni.load(tmp_path / "original")


@pytest.mark.parametrize("rope, original_max, prompt", [("longrope", 24, 30), ("longrope", 64, 20), (None, 32, 20)])
def test_a_standalone_phi3_decoder_matches_transformers(tmp_path: Path, rope: str | None, original_max: int,
                                                        prompt: int) -> None:
    """A `Phi3ForCausalLM` directory's config and fused weights through hf_phi3 into our Decoder: a batch's
    logits and a 16-token greedy run with our KV cache equal transformers' (its generate re-prefills when
    a run crosses original_max_position_embeddings, so each case stays on one side of it)."""
    from tinyomni.checkpoints.hf_phi3 import phi3_decoder_config, split_phi3
    from tinyomni.model.decoder import CacheState, Decoder

    text = phi3_text((3, 1), tied=rope is None, rope=rope, original_max=original_max)
    torch.manual_seed(0)
    reference = transformers.Phi3ForCausalLM(text).eval()
    base.randomize(reference, 2)
    if rope is None:
        reference.tie_weights()
    reference.save_pretrained(tmp_path)
    config = phi3_decoder_config(json.loads((tmp_path / "config.json").read_text()))
    state = load_file(str(tmp_path / "model.safetensors"))
    split_phi3(state, config)
    ours = Decoder(config).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())

    ids = torch.randint(5, config.vocab_size, (2, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_match(ours(ids)[0], reference(ids).logits)
        generated = reference.generate(ids[:1], max_new_tokens=16, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0, prompt:].tolist()
        cache = ours.new_cache(1, prompt + 16)
        logits, _ = ours(ids[:1], cache=CacheState(cache, torch.arange(prompt), prompt))
        tokens = []
        for step in range(16):
            tokens.append(int(logits[0, -1].argmax()))
            position = prompt + step
            logits, _ = ours(torch.tensor([[tokens[-1]]]), cache=CacheState(cache, torch.tensor([position]),
                                                                           position + 1))
    assert tokens == generated
    if rope == "longrope":
        assert (prompt > original_max) or (prompt + 16 <= original_max)


def saved_and_loaded_back(ours: tinyomni.Model, path: Path) -> tinyomni.Model:
    """`ours` saved as a tinyomni checkpoint and loaded back: same config, ids and logits."""
    ours.save(path)
    again = tinyomni.load(path)
    assert again.config == ours.config
    messages = base.conversation(base.noise_image(90, 60, seed=2))
    prompt = ours.prepare(messages)
    assert again.prepare(messages).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        assert torch.equal(ours.model(ids, pixel_values=prompt.pixel_values)[0],
                           again.model(ids, pixel_values=prompt.pixel_values)[0])
    return again


def test_saved_phi3_and_sentencepiece_internlm2_imports_load_back(tmp_path: Path) -> None:
    phi3_original(tmp_path / "phi3", "longrope-long-prompt")
    again = saved_and_loaded_back(tinyomni.load(tmp_path / "phi3" / "original"), tmp_path / "phi3-saved")
    assert again.config.decoder.rope_scaling["rope_type"] == "longrope"
    write_sentencepiece_files(tmp_path / "spm")
    internlm2_original(tmp_path / "internlm2", "linear-mha-tied", tokenizer=reference_sp_tokenizer(tmp_path / "spm"))
    original = tmp_path / "internlm2" / "original"
    (original / "tokenizer.json").unlink(missing_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        (original / name).write_bytes((tmp_path / "spm" / name).read_bytes())
    saved = tmp_path / "internlm2-saved"
    again = saved_and_loaded_back(tinyomni.load(original), saved)
    assert (saved / "tokenizer.json").is_file() and again.tokenizer.add_bos_token


def test_a_non_legacy_sentencepiece_tokenizer_gives_transformers_llama_ids(tmp_path: Path) -> None:
    """`"legacy": false` (Llama / Phi-3 tokenizer configs): only the input's start gets the dummy prefix, as
    transformers' LlamaTokenizer builds it from the same tokenizer.model; the legacy default would differ."""
    import random

    from tinyomni.processing.tokenizer import Tokenizer

    write_sentencepiece_files(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_config.json").read_text())
    meta.update(legacy=False, tokenizer_class="LlamaTokenizer", add_bos_token=False)
    meta.pop("auto_map")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(meta))
    reference = transformers.LlamaTokenizer.from_pretrained(tmp_path, legacy=False)
    ours = Tokenizer.from_dir(tmp_path)
    assert not ours.add_bos_token
    rng = random.Random(1)
    words = " ".join(SP_CORPUS).split() + ["é", "中", "\n", "  ", " ", *SP_USER_DEFINED, *INTERNVL_TOKENS[:3]]
    texts = [reference_sp_tokenizer(tmp_path).apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in CHATS]
    texts += [rng.choice(["", " "]).join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(200)]
    for text in texts:
        assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
    legacy = Tokenizer.from_dir(tmp_path).encode("<|im_end|> fox")
    meta["legacy"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(meta))
    assert Tokenizer.from_dir(tmp_path).encode("<|im_end|> fox") != legacy  # the flag is what changes them


def test_a_phi3_directory_loads_by_its_architecture(tmp_path: Path) -> None:
    """`tinyomni.load(dir)` of a `Phi3ForCausalLM` directory (families.py → hf_llama → hf_phi3): LongRoPE and
    the fused projections give transformers' logits, and the model answers through the usual path."""
    text = phi3_text((3, 1), tied=False, rope="longrope", original_max=24)
    torch.manual_seed(3)
    reference = transformers.Phi3ForCausalLM(text).eval()
    base.randomize(reference, 5)
    reference.save_pretrained(tmp_path)
    tokenizer = base.make_tokenizer("llama")
    tokenizer.save_pretrained(tmp_path)
    ours = tinyomni.load(tmp_path)
    ids = torch.tensor([tokenizer("a red circle and a blue square on the left of the picture")["input_ids"]])
    with torch.no_grad():
        assert_logits_match(ours.model(ids)[0], reference(ids).logits)
    assert ours.complete([{"role": "user", "content": "a red circle"}], max_new_tokens=4).token_ids
