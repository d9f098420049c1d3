"""Vision path: the ViT against transformers' SigLIP / CLIP / InternVL towers, pixel shuffle against
InternVL's own code, the projector, and the Hugging Face importer (config, names, files, errors).

Tiny random configs keep every test fast; parity is checked in float32 to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinyomni.checkpoints.hf_vision import (
    convert_hf_vision_state_dict,
    load_hf_vision_tower,
    load_vision_state_dict,
    plan_hf_vision_names,
    vision_config_from_hf,
)
from tinyomni.config import ACTIVATIONS, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError, InputError
from tinyomni.model.activations import ACT2FN
from tinyomni.model.projector import MultiModalProjector, pixel_shuffle
from tinyomni.model.vision import VisionEncoder

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    rel = err / max(ref.abs().max().item(), 1e-12)
    assert err <= tol or rel <= tol, f"max abs err {err:.2e}, rel {rel:.2e}"


NORM_WEIGHTS = ("norm.weight", "norm1.weight", "norm2.weight", "_before.weight", "_after.weight")


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, norms and layer scales included, so every weight's role is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(NORM_WEIGHTS):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def ours_from_hf(hf_model: torch.nn.Module) -> VisionEncoder:
    hf_config = hf_model.config.to_dict()
    model = VisionEncoder(vision_config_from_hf(hf_config)).eval()
    state = convert_hf_vision_state_dict(hf_model.state_dict(), hf_config["model_type"])
    load_vision_state_dict(model, state)
    model.load_state_dict(state, strict=True)  # the plain torch path accepts it too
    return model


def pixels(n: int, size: int | tuple[int, int], seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- parity with transformers --------------------------------------------------------------------------
def test_siglip_parity_and_interpolated_positions() -> None:
    config = transformers.SiglipVisionConfig(**TINY, image_size=42, vision_use_head=True)
    hf = transformers.SiglipVisionModel(config).eval()
    randomize(hf)
    ours = ours_from_hf(hf)
    assert ours.config.use_cls_token is False and ours.config.post_layernorm is True
    with torch.no_grad():
        x = pixels(2, 42)
        assert_close(ours(x), hf(pixel_values=x).last_hidden_state)
        # Other resolutions (square and not) resize the 3x3 position grid bicubically, like transformers.
        for size in (56, (28, 70)):
            x = pixels(2, size)
            ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            assert_close(ours(x), ref)


def test_clip_parity() -> None:
    config = transformers.CLIPVisionConfig(**TINY, image_size=28)
    hf = transformers.CLIPVisionModel(config).eval()
    randomize(hf, seed=1)
    ours = ours_from_hf(hf)
    assert ours.num_prefix_tokens == 1
    assert torch.all(ours.embeddings.patch_embedding.bias == 0)
    with torch.no_grad():
        x = pixels(2, 28)
        assert_close(ours(x), hf(pixel_values=x).last_hidden_state)
        x = pixels(1, 42)
        assert_close(ours(x), hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state)


@pytest.mark.parametrize(
    "switches",
    [
        # InternViT-300M shape: LayerNorm, layer scale, no final norm (mean pooling), no qkv bias.
        dict(use_qk_norm=True, norm_type="layer_norm", use_mean_pooling=True, attention_bias=False),
        # InternViT-6B shape: RMSNorm blocks; plus the final LayerNorm and a qkv bias.
        dict(use_qk_norm=False, norm_type="rms_norm", use_mean_pooling=False, attention_bias=True),
        dict(use_qk_norm=True, norm_type="rms_norm", use_mean_pooling=True, attention_bias=False),
    ],
)
def test_internvl_parity(switches: dict) -> None:
    config = transformers.InternVLVisionConfig(
        **TINY, image_size=28, layer_scale_init_value=0.1, hidden_act="gelu", **switches
    )
    hf = transformers.InternVLVisionModel(config).eval()
    randomize(hf, seed=2)
    ours = ours_from_hf(hf)
    assert ours.config.qk_norm == switches["use_qk_norm"]
    assert ours.config.layer_scale_init == pytest.approx(0.1)
    with torch.no_grad():
        x = pixels(2, 28)
        assert_close(ours(x), hf(pixel_values=x).last_hidden_state)
        x = pixels(1, 56)  # InternVL always interpolates a grid that differs
        assert_close(ours(x), hf(pixel_values=x).last_hidden_state)


# --- the module on its own ---------------------------------------------------------------------------------
def test_every_switch_runs_and_shapes() -> None:
    config = VisionConfig(
        image_size=28, patch_size=14, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, hidden_act="quick_gelu", norm_type="rms_norm", qkv_bias=False,
        use_cls_token=True, pre_layernorm=True, post_layernorm=True, layer_scale_init=1e-2, qk_norm=True,
    )
    model = VisionEncoder(config)
    names = set(model.state_dict())
    for name in ("embeddings.patch_embedding.bias", "embeddings.class_embedding", "pre_layernorm.weight",
                 "encoder.layers.0.ls1", "encoder.layers.0.self_attn.q_norm.weight", "post_layernorm.bias"):
        assert name in names
    assert "encoder.layers.0.self_attn.q_proj.bias" not in names
    assert torch.allclose(model.encoder.layers[0].ls2, torch.full((32,), 1e-2))
    assert model(pixels(3, 28)).shape == (3, 1 + 4, 32)
    assert model(pixels(1, (42, 14))).shape == (1, 1 + 3, 32)
    with pytest.raises(InputError, match="multiple of the vision patch size 14"):
        model(pixels(1, 30))


def test_conv_stem_makes_a_hybrid_vit_with_the_same_token_grid() -> None:
    config = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, conv_stem=(8, 16, 16))
    model = VisionEncoder(config)
    names = set(model.state_dict())
    for name in ("embeddings.conv_stem.0.conv.weight", "embeddings.conv_stem.2.norm.running_var",
                 "embeddings.patch_embedding.weight"):
        assert name in names
    assert model.embeddings.patch_embedding.weight.shape == (32, 16, 3, 3)
    assert model(pixels(2, 32)).shape == (2, 16, 32)  # 32 px / 8 px patches = a 4x4 grid, as without a stem
    assert model(pixels(1, (48, 16))).shape == (1, 12, 32)
    # In eval mode BatchNorm uses its running statistics: an image's features do not depend on its batch.
    model.eval()
    batch = pixels(3, 32)
    with torch.no_grad():
        assert torch.allclose(model(batch)[:1], model(batch[:1]), atol=1e-5)
    round_trip = OmniConfig.from_dict(OmniConfig(vision=config, vision_projector=ProjectorConfig(
        downsample_ratio=0.5)).to_dict())
    assert round_trip.vision == config
    with pytest.raises(ConfigError, match="conv_stem has 2 stride-2 convs, which make patches of 4 px"):
        VisionConfig(patch_size=8, conv_stem=(8, 16)).validate()


def test_bf16_forward_is_close_to_fp32() -> None:
    model = VisionEncoder(VisionConfig(image_size=28, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4)).eval()
    x = pixels(1, 42)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


def test_activation_table_matches_config() -> None:
    assert set(ACT2FN) == ACTIVATIONS
    x = torch.linspace(-3, 3, 11)
    assert torch.allclose(ACT2FN["quick_gelu"](x), x * torch.sigmoid(1.702 * x))


# --- pixel shuffle and projector -------------------------------------------------------------------------
def internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVLChatModel.pixel_shuffle (OpenGVLab's modeling_internvl_chat.py), ps_version 'v2'."""
    n, w, h, c = x.size()
    # N, W, H, C --> N, W, H * scale, C // scale
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    # N, W, H * scale, C // scale --> N, H * scale, W, C // scale
    x = x.permute(0, 2, 1, 3).contiguous()
    # N, H * scale, W, C // scale --> N, H * scale, W * scale, C // (scale ** 2)
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("shape,factor", [((2, 4, 4, 8), 0.5), ((1, 4, 6, 3), 0.5), ((1, 6, 3, 2), 1 / 3),
                                          ((1, 2, 2, 5), 1.0)])
def test_pixel_shuffle_matches_internvl(shape: tuple, factor: float) -> None:
    x = torch.randn(shape)
    ours = pixel_shuffle(x, factor)
    k = round(1 / factor)
    assert ours.shape == (shape[0], shape[1] // k, shape[2] // k, shape[3] * k * k)
    assert torch.equal(ours, internvl_pixel_shuffle(x, factor))


def test_pixel_shuffle_gathers_a_block_of_neighbours() -> None:
    # Each output token holds the channels of one 2x2 block of patches, whatever their order.
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = pixel_shuffle(x, 0.5)
    assert sorted(out[0, 0, 0].tolist()) == [0.0, 1.0, 4.0, 5.0]
    assert sorted(out[0, 1, 1].tolist()) == [10.0, 11.0, 14.0, 15.0]


def test_pixel_shuffle_errors() -> None:
    with pytest.raises(InputError, match="divisible by 2, got 5x4"):
        pixel_shuffle(torch.zeros(1, 5, 4, 8), 0.5)
    with pytest.raises(InputError, match="1/k"):
        pixel_shuffle(torch.zeros(1, 4, 4, 8), 0.3)
    with pytest.raises(InputError, match=r"\[N, h, w, C\]"):
        pixel_shuffle(torch.zeros(4, 4, 8), 0.5)


def test_projector_shapes_and_names() -> None:
    proj = MultiModalProjector(32 * 4, 48)
    assert proj(torch.randn(2, 16, 128)).shape == (2, 16, 48)
    assert set(proj.state_dict()) == {f"{m}.{p}" for m in ("layer_norm", "linear_1", "linear_2")
                                      for p in ("weight", "bias")}
    assert proj.linear_1.weight.shape == (48, 128)
    proj = MultiModalProjector(128, 48, hidden_features=96)
    assert proj.linear_1.out_features == 96 and proj(torch.randn(5, 128)).shape == (5, 48)


def test_projector_matches_transformers_internvl_projector() -> None:
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(model_type="qwen2", hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5)
    ref = transformers.models.internvl.modeling_internvl.InternVLMultiModalProjector(config).eval()
    randomize(ref, seed=3)
    ours = MultiModalProjector(16 * 4, 24)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert_close(ours(x), ref(x))


# --- importer: names, files, errors ----------------------------------------------------------------------
def test_composite_checkpoint_keeps_only_the_vision_tower() -> None:
    keys = ["vision_model.embeddings.patch_embedding.weight", "vision_model.head.probe",
            "text_model.embeddings.token_embedding.weight", "logit_scale",
            "vision_model.encoder.layers.3.mlp.fc2.bias"]
    assert plan_hf_vision_names(keys, "siglip") == {
        "vision_model.embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.3.mlp.fc2.bias": "encoder.layers.3.mlp.fc2.bias",
    }
    keys = ["model.vision_tower.encoder.layer.0.attention.projection_layer.weight",
            "model.multi_modal_projector.linear_1.weight", "model.language_model.norm.weight"]
    assert plan_hf_vision_names(keys, "internvl") == {
        "model.vision_tower.encoder.layer.0.attention.projection_layer.weight":
            "encoder.layers.0.self_attn.out_proj.weight",
    }


def test_unknown_tower_weight_is_named() -> None:
    with pytest.raises(CheckpointError, match="vision_model.encoder.layers.0.mlp.fc3.weight"):
        plan_hf_vision_names(["vision_model.encoder.layers.0.mlp.fc3.weight"], "clip")
    with pytest.raises(CheckpointError, match="unsupported vision model_type 'vit'"):
        vision_config_from_hf({"model_type": "vit"})


def _save_siglip(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    vision = dict(**TINY, image_size=28)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    randomize(hf, seed=4)
    path = tmp_path / "siglip"
    hf.save_pretrained(path)
    return path, hf


def test_load_hf_vision_tower_round_trip(tmp_path: Path) -> None:
    path, hf = _save_siglip(tmp_path)
    ours = load_hf_vision_tower(path).eval()
    x = pixels(2, 28)
    with torch.no_grad():
        assert_close(ours(x), hf.vision_model(pixel_values=x).last_hidden_state)
    assert ours.config.image_mean == (0.5, 0.5, 0.5)

    # Sharded, with an index, and a preprocessor_config.json that sets the normalisation.
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                               "image_std": [0.4, 0.5, 0.6]}))
    sharded = load_hf_vision_tower(path, dtype=torch.bfloat16)
    assert sharded.config.image_std == (0.4, 0.5, 0.6)
    assert sharded.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    for k, v in ours.state_dict().items():
        assert torch.equal(sharded.state_dict()[k].float(), v.to(torch.bfloat16).float()), k


def test_load_hf_vision_tower_missing_weight(tmp_path: Path) -> None:
    path, _ = _save_siglip(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks vision weight\(s\) vision_model\.encoder\.layers\.1"
                                              r"\.self_attn\.k_proj\.weight"):
        load_hf_vision_tower(path)


def test_load_hf_vision_tower_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_vision_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", **TINY,
                                                      "image_size": 28}))
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_hf_vision_tower(tmp_path)


def test_converted_weights_must_fit_the_config() -> None:
    config = VisionConfig(image_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4)
    model = VisionEncoder(config)
    state = model.state_dict()
    state["embeddings.position_embedding.weight"] = torch.zeros(9, 32)
    state["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    del state["post_layernorm.bias"]
    with pytest.raises(CheckpointError) as info:
        load_vision_state_dict(model, state)
    message = str(info.value)
    assert "missing post_layernorm.bias" in message
    assert "unexpected encoder.layers.1.mlp.fc1.weight" in message
    assert "embeddings.position_embedding.weight (checkpoint (9, 32), model (4, 32))" in message


def test_load_vision_tower_of_a_whole_internvl_checkpoint(tmp_path: Path) -> None:
    vision = dict(**TINY, image_size=28, use_qk_norm=True)
    text = dict(model_type="qwen2", hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=63)
    hf = transformers.InternVLForConditionalGeneration(config).eval()
    randomize(hf, seed=5)
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision_tower(tmp_path).eval()
    assert ours.config.image_mean == (0.485, 0.456, 0.406)
    x = pixels(1, 28)
    with torch.no_grad():
        assert_close(ours(x), hf.model.vision_tower(pixel_values=x).last_hidden_state)
