"""The MoE decoder (`DecoderConfig.kind = "moe"`, tinyomni/model/moe.py): its MLP equals a token-by-token
reference, its config is checked, the engine's quantizer covers the experts (logits stay close), the routing
statistics and the load-balancing loss are what they claim, and recipes/toy-moe.toml trains it (under Aria's
projector) on the world with the expert load in the training log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from parity import relative_error

import tinyomni
from tinyomni.checkpoints.aria import write_tiny_moe_base
from tinyomni.config import DecoderConfig, OmniConfig
from tinyomni.errors import ConfigError
from tinyomni.model.aria_projector import AriaProjector
from tinyomni.model.moe import MoEDecoder, MoEMLP, routing_aux_loss, take_routing_load
from tinyomni.model.omni import OmniModel

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**fields) -> DecoderConfig:
    base = dict(kind="moe", vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                num_experts=4, num_experts_per_tok=2, num_shared_experts=1)
    return DecoderConfig(**{**base, **fields})


@pytest.mark.parametrize("top_k, shared", [(1, 0), (2, 1), (3, 2)])
def test_moe_mlp_equals_a_token_by_token_reference(top_k: int, shared: int) -> None:
    torch.manual_seed(0)
    config = tiny_config(num_experts_per_tok=top_k, num_shared_experts=shared)
    mlp = MoEMLP(config)
    torch.nn.init.normal_(mlp.router.weight)
    x = torch.randn(2, 5, config.hidden_size)
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            token = x[b, t]
            logits = mlp.router.weight @ token
            chosen = logits.topk(top_k).indices
            weights = logits[chosen].softmax(0)  # the softmax over the chosen experts only (Aria's rule)
            for w, e in zip(weights, chosen.tolist()):
                ex = mlp.experts[e]
                expected[b, t] += w * ex.down_proj(F.silu(ex.gate_proj(token)) * ex.up_proj(token))
            if shared:
                s = mlp.shared_experts
                expected[b, t] += s.down_proj(F.silu(s.gate_proj(token)) * s.up_proj(token))
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert len(mlp.experts) == 4
    assert (mlp.shared_experts is None) == (shared == 0)
    if shared:
        assert mlp.shared_experts.gate_proj.out_features == 32 * shared


def test_config_is_checked_and_round_trips(tmp_path: Path) -> None:
    config = OmniConfig(decoder=tiny_config(router_aux_loss_coef=0.01), vision=None, audio=None)
    config.save(tmp_path / "config.json")
    again = OmniConfig.load(tmp_path / "config.json")
    assert again.decoder == config.decoder
    assert isinstance(OmniModel(again).language_model, MoEDecoder)
    with pytest.raises(ConfigError, match="num_experts_per_tok \\(5\\) of num_experts \\(4\\)"):
        tiny_config(num_experts_per_tok=5).validate()
    with pytest.raises(ConfigError, match="decoder.kind must be llama, opt, phi or moe"):
        tiny_config(kind="mixtral").validate()


# Measured (2026-12-02): 0.0085 (int8) and 0.126 (int4) here, where a dense Llama of the same sizes gives 0.0076
# and 0.117 (most of it the tiny random model's quantized token table and head).
@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.25)])
def test_quantize_model_covers_the_experts(mode: str, bound: float) -> None:
    """quantize_model swaps every expert's (and the shared experts') linears; the router stays float; the
    quantized logits stay close to the float ones."""
    from tinyomni.engine import quantize_model
    from tinyomni.engine.modules import QuantLinear

    torch.manual_seed(0)
    model = OmniModel(OmniConfig(decoder=tiny_config(), vision=None, audio=None)).eval()
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        before = model.language_model(ids)[0]
        quantize_model(model, mode, gguf=False)
        after = model.language_model(ids)[0]
    for layer in model.language_model.model.layers:
        linears = [m for e in layer.mlp.experts for m in (e.gate_proj, e.up_proj, e.down_proj)]
        linears += [layer.mlp.shared_experts.gate_proj, layer.mlp.shared_experts.down_proj]
        assert all(isinstance(m, QuantLinear) and m.kind == mode for m in linears)
        assert isinstance(layer.mlp.router.weight, torch.nn.Parameter)  # float, untouched
    error = relative_error(after, before)
    assert 0 < error <= bound, error


def test_routing_load_and_the_balancing_loss() -> None:
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.5, num_hidden_layers=1)
    decoder = MoEDecoder(config).train()
    ids = torch.randint(0, 96, (3, 10))
    decoder(ids)
    decoder(ids)  # counts add up over forwards until taken
    load = take_routing_load(decoder)
    assert len(load) == 1 and len(load[0]) == 4 and abs(sum(load[0]) - 1) < 1e-6
    # Counted, not guessed: the share per expert, recomputed from the layer's router on the layer's input.
    layer = decoder.model.layers[0]
    with torch.no_grad():
        h = decoder.embed(ids)
        cos, sin = decoder.model.rotary_emb(torch.arange(10).expand(3, 10), torch.float32)
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, None, None)
        logits, _, index = layer.mlp.route(layer.post_attention_layernorm(h).reshape(-1, config.hidden_size))
    counts = torch.bincount(index.flatten(), minlength=4).float()
    assert load[0] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)
    assert take_routing_load(decoder) is None  # reset: nothing since
    # Switch's loss of the last forward: coef * E * sum_e f_e * P_e (f: share of slots, P: mean probability).
    expected = 0.5 * 4 * ((counts / index.numel()) * logits.softmax(-1).mean(0)).sum()
    aux = routing_aux_loss(decoder)
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    assert routing_aux_loss(decoder) is None  # taken once
    decoder.zero_grad()
    decoder(ids)
    routing_aux_loss(decoder).backward()
    assert layer.mlp.router.weight.grad.abs().sum() > 0
    assert layer.mlp.experts[0].gate_proj.weight.grad is None  # only the router learns from it
    take_routing_load(decoder)
    decoder.eval()
    decoder(ids)
    assert take_routing_load(decoder) is None and routing_aux_loss(decoder) is None  # eval forwards: not counted


@pytest.fixture(scope="module")
def moe_base(tiny, tmp_path_factory) -> Path:
    """The toy recipe's base: a tiny MoE decoder in Aria's layout with SmolLM2's tokenizer and template."""
    path = tmp_path_factory.mktemp("tiny-moe-base")
    return write_tiny_moe_base(path, tiny.tokenizer, tiny.chat_template, router_aux_loss_coef=0.01)


def test_toy_moe_recipe_trains_on_the_world_and_logs_expert_load(moe_base: Path, tmp_path: Path) -> None:
    from tinyomni.train import load_recipe, train

    recipe = load_recipe(ROOT / "recipes" / "toy-moe.toml",
                         [f'model.base="{moe_base}"', f'run.out="{tmp_path / "run"}"'])
    result = train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    losses = [r["loss"] for r in train_rows]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # every 2nd step logged, no NaN
    assert losses[-1] < losses[0], losses
    for row in train_rows:
        load = row["expert_load"]
        assert len(load) == 2 and all(len(layer) == 4 and abs(sum(layer) - 1) < 1e-3 for layer in load)
    model = tinyomni.load(result.model_dir)
    assert model.config.decoder.kind == "moe" and model.config.decoder.router_aux_loss_coef == 0.01
    assert isinstance(model.model.language_model, MoEDecoder)
    assert isinstance(model.model.multi_modal_projector, AriaProjector) and model.config.image_tokens_per_tile == 8
    from PIL import Image

    picture = Image.new("RGB", (60, 40), (220, 20, 20))  # padded below to the 56-px tile
    prompt = model.prepare([{"role": "user", "content": [{"type": "image", "image": picture},
                                                         {"type": "text", "text": "Colour?"}]}])
    assert prompt.input_ids.count(model.processor.image_context_id) == 8
    assert bool(torch.isnan(prompt.pixel_values).any())
    assert isinstance(model.chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                               {"type": "text", "text": "Colour?"}]}],
                                 max_new_tokens=3), str)


def test_the_balancing_loss_enters_the_sft_loss() -> None:
    """ChatForward (every sft step's loss) adds coef-weighted aux times the labelled tokens, which the step
    divides by them: the step's loss is the mean cross-entropy + router_aux_loss_coef * aux."""
    from tinyomni.train.data import ChatBatch
    from tinyomni.train.trainer import ChatForward

    torch.manual_seed(0)
    model = OmniModel(OmniConfig(decoder=tiny_config(router_aux_loss_coef=0.5), vision=None, audio=None)).train()
    ids = torch.randint(0, 96, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = ChatBatch(ids, labels, pixel_values=None, audio_features=[], samples=2)
    total = ChatForward(model)(batch)
    decoder = model.language_model
    logits = decoder(ids)[0]
    aux = routing_aux_loss(decoder)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    tokens = int((labels[:, 1:] != -100).sum())
    assert aux is not None and aux.item() > 0
    assert total.item() == pytest.approx(ce.item() + aux.item() * tokens, rel=1e-5)
    assert routing_aux_loss(decoder) is None  # taken once
