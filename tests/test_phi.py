"""Phi decoders (transformers' `PhiForCausalLM`, TinyGPT-V's language model) load with exact parity: tiny
random checkpoints are saved with a byte-level BPE tokenizer, loaded with `tinyomni.load(dir)` (a text decoder:
an omni model is built around it), and compared with transformers on fp32 logits and a 16-token greedy
continuation through tinyomni's generation loop (prefill, then one-token steps on the KV cache). Also: the
errors for what does not load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from parity import relative_error
from test_interop_llava import edit_json, make_tokenizer, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError
from tinyomni.generate import Generation
from tinyomni.model.phi import PhiDecoder
from tinyomni.processing.chat import Prompt

transformers = pytest.importorskip("transformers")

TEXT = "The quick brown fox jumps over the lazy dog, and then it counts: one two three"


def build(path: Path, heads: int = 3, kv_heads: int | None = None, head_dim: int = 16, rotary: float = 0.5,
          qk_layernorm: bool = False, tied: bool = False, seed: int = 0):
    """A tiny Phi checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer("qwen2", path)
    config = transformers.PhiConfig(
        vocab_size=len(tokenizer) + 16,  # padded past the tokenizer, as Phi-2's table is (room for media tokens)
        hidden_size=heads * head_dim, intermediate_size=72, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, max_position_embeddings=256, partial_rotary_factor=rotary,
        qk_layernorm=qk_layernorm, tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, architectures=["PhiForCausalLM"])
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    return model, tokenizer


CASES = {
    # Phi-1.5 / transformers' default: rotary on half of 16 channels (8), 3 heads, untied, no q/k norm.
    "half-rotary-untied": dict(heads=3, head_dim=16, rotary=0.5, qk_layernorm=False, tied=False),
    # Phi-2's factor 0.4 truncates: int(16 * 0.4) = 6 rotary channels; 5 heads, q/k LayerNorms, tied.
    "0.4-rotary-qk-norm-tied": dict(heads=5, head_dim=16, rotary=0.4, qk_layernorm=True, tied=True),
    # grouped keys (3 query heads per key head), int(20 * 0.4) = 8 rotary channels
    "0.4-rotary-gqa": dict(heads=3, kv_heads=1, head_dim=20, rotary=0.4, qk_layernorm=True, tied=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference, tokenizer = build(tmp_path, **options, seed=len(case))
    assert family_for(tmp_path)[1].name == "decoder"
    ours = tinyomni.load(tmp_path)
    decoder = ours.model.language_model
    assert isinstance(decoder, PhiDecoder)
    assert ours.config.decoder.kind == "phi"
    assert ours.config.decoder.tie_word_embeddings == options["tied"]
    assert (decoder.lm_head.weight is decoder.model.embed_tokens.weight) == options["tied"]

    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ours.tokenizer.encode(TEXT) == ids[0].tolist()
    with torch.no_grad():
        logits, _ = ours.model(ids)
        theirs = reference(ids).logits
    vocab = theirs.shape[-1]  # ours has the same table (the media tokens took padding rows)
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


def test_batches_and_the_serving_engine_match_single_rows(tmp_path: Path) -> None:
    """Two prompts of different lengths in one batch (left padding, a mask on the cache), and in the serving
    engine, give each row's own greedy continuation."""
    build(tmp_path, heads=3, rotary=0.5, qk_layernorm=True)
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


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phi")
    build(path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5}), "rope type 'dynamic'"),
    (lambda c: c["rope_parameters"].update(partial_rotary_factor=0.35), "partial_rotary_factor 0.35"),
    (lambda c: c.update(hidden_act="swish_glu"), "hidden_act 'swish_glu'"),
])
def test_unsupported_config_values_are_named(change, message: str, phi_dir: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(phi_dir, tmp_path / "ckpt"))
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_flat_transformers_4_config_is_read(phi_dir: Path) -> None:
    """Phi-2's own config.json spells the rotary settings at the top level (transformers 4)."""
    from tinyomni.checkpoints.hf_phi import phi_decoder_config

    hf = {"model_type": "phi", "vocab_size": 100, "hidden_size": 80, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 5, "num_key_value_heads": None,
          "partial_rotary_factor": 0.4, "rope_theta": 500.0, "rope_scaling": None, "qk_layernorm": False}
    config = phi_decoder_config(hf)
    assert (config.kind, config.rotary_dim, config.rope_theta, config.num_key_value_heads) == ("phi", 6, 500.0, 5)


def test_saved_model_reloads_as_phi(tmp_path: Path) -> None:
    """A model built on a Phi base saves (base cited, or the decoder stored) and reloads to the same logits."""
    build(tmp_path / "base", heads=3, head_dim=20, rotary=0.4, qk_layernorm=True, tied=True)
    ours = tinyomni.load(tmp_path / "base")
    ids = torch.tensor([ours.tokenizer.encode(TEXT)])
    with torch.no_grad():
        expected, _ = ours.model(ids)
        for store_decoder in (None, True):
            reloaded = tinyomni.load(ours.save(tmp_path / f"saved-{store_decoder}", store_decoder=store_decoder))
            assert reloaded.config.decoder.qk_layernorm and reloaded.config.decoder.rotary_dim == 8
            assert torch.equal(reloaded.model(ids)[0], expected)


def test_int4_runs_tied_and_untied_keeping_the_head_bias(tmp_path: Path) -> None:
    """int4 swaps every linear, biases kept (the Llama-only fused step is never called); a tied head is
    rebuilt from the embedding table's blocks and keeps Phi's head bias."""
    for tied in (False, True):
        build(tmp_path / f"tied-{tied}", tied=tied)
        ours = tinyomni.load(tmp_path / f"tied-{tied}")
        quantized = tinyomni.load(tmp_path / f"tied-{tied}", quantize="int4")
        ids = torch.tensor([ours.tokenizer.encode(TEXT)])
        with torch.no_grad():
            error = relative_error(quantized.model(ids)[0], ours.model(ids)[0])
        assert 0 < error < 0.5, tied  # random 0.1-scale weights at width 48: a same-size Llama measures ~0.2 too
        assert torch.equal(quantized.model.language_model.lm_head.bias, ours.model.language_model.lm_head.bias)
