"""The decoder matches transformers: the real SmolLM2 GGUF, and tiny random Llama and Qwen2 configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from tinyomni.checkpoints.gguf import smollm2_gguf_path
from tinyomni.checkpoints.hf_llama import load_hf_decoder
from tinyomni.generate import Generation, SamplingParams
from tinyomni.model.decoder import CacheState, Decoder


@pytest.fixture(scope="module")
def hf_smollm2():
    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_smollm2_logits_and_greedy_continuation_match_transformers(smollm2, hf_smollm2):
    messages = [{"role": "user", "content": "Write a short paragraph about the sea."}]
    ids = smollm2.prepare(messages).input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, _ = smollm2.model.language_model(x)
        theirs = hf_smollm2(x).logits
    # Our decoder has 6 extra rows (the media tokens); compare the shared vocabulary.
    ours = ours[..., : theirs.shape[-1]]
    assert relative_error(ours, theirs) <= 1e-4
    assert (ours - theirs).abs().max().item() / theirs.abs().max().item() <= 1e-4

    completion = smollm2.complete(messages, max_new_tokens=32)
    with torch.no_grad():
        reference = hf_smollm2.generate(x, max_new_tokens=32, do_sample=False)
    assert completion.token_ids == reference[0, len(ids):].tolist()
    assert len(completion.token_ids) == 32


def test_smollm2_tokenizer_matches_transformers(smollm2):
    path = smollm2_gguf_path()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello, world!", "<|im_start|>user\nWhat's 12+30?<|im_end|>\n", "  spaces\tand\nnewlines ",
                 "naïve café — 東京 🙂", "def f(x):\n    return x**2"]:
        assert smollm2.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
        assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(text), skip_special_tokens=False) == text


def tiny_hf_model(kind: str, tmp_path):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases too, so a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_random_decoders_match_transformers(kind, tmp_path):
    reference = tiny_hf_model(kind, tmp_path)
    config, state = load_hf_decoder(tmp_path)
    assert config.attention_bias == (kind == "qwen2")
    ours = Decoder(config)
    ours.load_state_dict(state, strict=not config.tie_word_embeddings)
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        a, _ = ours(x)
        b = reference(x).logits
    assert relative_error(a, b) <= 1e-5


def test_cached_decoding_equals_full_forward(tiny):
    """Prefill + one-token steps through the KV cache give the logits of one full forward."""
    decoder = tiny.model.language_model
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        full, _ = decoder(x)
        kv = decoder.new_cache(1, 32)
        first, _ = decoder(x[:, :8], cache=CacheState(kv, torch.arange(8), 8))
        steps = [first[:, -1]]
        for i in range(8, 12):
            logits, _ = decoder(x[:, i:i + 1], cache=CacheState(kv, torch.tensor([i]), i + 1))
            steps.append(logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 7:11], atol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone(smollm2):
    conversations = ["What is the capital of France?", "Count from one to five.", "Hi"]
    alone = [smollm2.complete(c, max_new_tokens=12).token_ids for c in conversations]
    prompts = [smollm2.prepare(c) for c in conversations]
    generation = Generation(smollm2.model, smollm2.tokenizer, prompts, SamplingParams(max_new_tokens=12),
                            smollm2.suppress_ids)
    list(generation)
    assert [c.token_ids for c in generation.completions] == alone


def test_per_row_cache_slots_match_shared_slots(tiny):
    """Rows written at their own slots (as a continuous-batching server does) read back the same."""
    decoder = tiny.model.language_model
    x = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        shared, _ = decoder(x, cache=CacheState(decoder.new_cache(2, 16), torch.arange(6), 6))
        kv = decoder.new_cache(2, 16)
        rows = []
        for r in range(2):  # prefill each row on its own, into its own cache row
            out, _ = decoder(x[r:r + 1], cache=CacheState(kv, torch.arange(6), 6, rows=torch.tensor([r])))
            rows.append(out)
    assert torch.allclose(torch.cat(rows), shared, atol=1e-5)
