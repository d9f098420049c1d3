"""Exporting a decoder to GGUF: the file llama.cpp loads holds every tensor under its names with the
right shapes and types, the metadata its loader reads, and our tokenizer and template; read back (by
our importer) it is the same network, to the bit in f32."""

from __future__ import annotations

import dataclasses

import gguf
import pytest
import torch

import tinyomni
from tinyomni.api import Model, tiny_random_model
from tinyomni.checkpoints.export_gguf import export_gguf
from tinyomni.checkpoints.gguf import load_gguf
from tinyomni.errors import InputError
from tinyomni.model.omni import OmniModel

NEEDED_KEYS = ["general.architecture", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
               "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
               "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]
ARCH_KEYS = ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "rope.dimension_count"]


def variant(tie: bool = True, bias: bool = False, seed: int = 0) -> Model:
    """The tiny model with an untied head and/or Qwen2-style q/k/v biases, weights drawn at random."""
    base = tiny_random_model(seed)
    config = dataclasses.replace(base.config, decoder=dataclasses.replace(
        base.config.decoder, tie_word_embeddings=tie, attention_bias=bias, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    torch.manual_seed(seed)
    model = OmniModel(config)
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return Model(model, base.tokenizer, base.chat_template, name="variant")


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_f32_export_reads_back_as_the_same_network(tmp_path, tie, bias):
    model = variant(tie, bias)
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    config, state, tok = load_gguf(path)
    ours = model.config.decoder
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "attention_bias", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(config, field) == getattr(ours, field), field
    assert config.attn_head_dim == ours.attn_head_dim
    reference = {k: v for k, v in model.model.language_model.state_dict().items() if "rotary" not in k}
    if tie:
        reference.pop("lm_head.weight")
    assert set(state) == set(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
    assert tok.chat_template == model.chat_template
    # the whole model, loaded from the file like any GGUF, answers exactly as the original
    loaded = tinyomni.load(str(path))
    prompt = model.prepare("What is 2+2?")
    assert loaded.prepare("What is 2+2?").input_ids == prompt.input_ids  # same tokenizer and template
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        want, _ = model.model(ids)
        got, _ = loaded.model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outtype,matrix_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_every_tensor_and_the_metadata_llama_cpp_needs(tmp_path, outtype, matrix_type):
    model = variant(tie=False)
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", outtype))
    arch = reader.fields["general.architecture"].contents()
    assert arch == "llama"
    for key in NEEDED_KEYS + [f"{arch}.{k}" for k in ARCH_KEYS]:
        assert key in reader.fields, key
    tensors = {t.name: t for t in reader.tensors}
    layers = model.config.decoder.num_hidden_layers
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight",
                                                        "attn_v.weight", "attn_output.weight", "ffn_norm.weight",
                                                        "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")}
    assert set(tensors) == expected
    hidden = model.config.decoder.hidden_size
    assert [int(d) for d in tensors["blk.0.attn_q.weight"].shape] == [hidden, 2 * 16]  # fastest dim first
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == matrix_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == model.config.decoder.vocab_size
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[model.tokenizer.token_to_id("<IMG_CONTEXT>")] == 3  # media tokens are control tokens
    # quantized weights stay close to the float ones
    _, state, _ = load_gguf(tmp_path / "m.gguf")
    reference = model.model.language_model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert (state["model.layers.0.mlp.up_proj.weight"] - reference).abs().max() < 0.01


def test_bad_outtype_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="outtype"):
        export_gguf(tiny_random_model(), tmp_path / "m.gguf", "q3_k")
    assert not (tmp_path / "m.gguf").exists()


def test_export_command(tmp_path):
    from tinyomni.cli import main

    model = tiny_random_model()
    model.save(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 0
    assert load_gguf(tmp_path / "x.gguf")[0].vocab_size == model.config.decoder.vocab_size


def test_an_unmerged_adapter_is_exported_merged(tmp_path):
    from tinyomni.model import lora

    model = variant()
    lora.apply_lora(model.model, lora.LoraConfig(r=2, alpha=4, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    want = lora.merged_state_dict(model.model.language_model)
    _, state, _ = load_gguf(export_gguf(model, tmp_path / "m.gguf", "f32"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(state[name], want[name])
        assert not torch.equal(state[name], model.model.language_model.state_dict()[name])  # base weight alone differs


def test_llama_cpp_runs_the_export_and_answers_the_same(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # a benchmark peer, not a dependency (docs/benchmarks.md)
    model = variant(tie=False, seed=4)
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        for question in ("What is 2+2?", "Name a colour."):
            ids = model.prepare(question).input_ids
            ours = model.complete(question, max_new_tokens=12, max_repeat_tokens=0, ignore_eos=True)
            theirs = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                theirs.append(token)
                if len(theirs) == 12:
                    break
            assert theirs == ours.token_ids  # greedy ids, so a split UTF-8 character cannot blur the match
    finally:
        llm.close()
