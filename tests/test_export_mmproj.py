"""Exporting the vision side as llama.cpp's mmproj GGUF: every tensor clip.cpp reads under its name, shape
and type, the metadata its loader requires, refusals that name what its graphs cannot compute, and (with
llama-cpp-python's build of mtmd) the same image embeddings as ours, per projector type."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

import tinyomni
from tinyomni.api import Model, tiny_random_model
from tinyomni.checkpoints.export_gguf import export_gguf
from tinyomni.checkpoints.export_mmproj import export_mmproj, mmproj_problems
from tinyomni.cli import main
from tinyomni.config import OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import InputError
from tinyomni.model.omni import OmniModel
from tinyomni.processing.image import image_to_tensor

# What clip.cpp's loader reads without a default (clip_model_loader::load_hparams), plus what ours sets.
REQUIRED_KEYS = ["general.architecture", "clip.has_vision_encoder", "clip.projector_type",
                 "clip.vision.image_size", "clip.vision.patch_size", "clip.vision.embedding_length",
                 "clip.vision.feed_forward_length", "clip.vision.block_count", "clip.vision.attention.head_count",
                 "clip.vision.attention.layer_norm_epsilon", "clip.vision.projection_dim",
                 "clip.vision.image_mean", "clip.vision.image_std"]
SIDE = 56  # tile side: a 4 x 4 patch grid

VISION = {
    # InternViT-shaped: CLS token, layer scale, no final norm, pixel shuffle 0.5, LayerNorm-MLP projector
    "internvl": (VisionConfig(image_size=SIDE, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu_pytorch_tanh",
                              use_cls_token=True, post_layernorm=False, layer_scale_init=0.5,
                              image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225)),
                 ProjectorConfig(downsample_ratio=0.5)),
    # SmolVLM-shaped: SigLIP with bucketed positions, pixel shuffle, one bias-free linear
    "idefics3": (VisionConfig(image_size=SIDE, patch_size=14, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, position_buckets=True),
                 ProjectorConfig(downsample_ratio=0.5, kind="linear")),
    # LLaVA projector on a tower without CLS, two hidden states concatenated (one of them the input)
    "mlp": (VisionConfig(image_size=SIDE, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, hidden_act="quick_gelu", pre_layernorm=True, feature_layers=(0, 2)),
            ProjectorConfig(downsample_ratio=1.0, layer_norm=False)),
}


@functools.cache
def _base() -> Model:
    return tiny_random_model(0)


def vision_model(kind: str, **vision_changes) -> Model:
    """A tiny random model with the `kind` tower and projector; the vision weights drawn large enough that
    a wrong layout cannot pass for a right one (the decoder keeps its initialisation: only its width and
    vocabulary matter to llama.cpp here)."""
    base = _base()
    vision, projector = VISION[kind]
    config = dataclasses.replace(base.config, vision=dataclasses.replace(vision, **vision_changes),
                                 vision_projector=projector, audio=None, min_tiles=1, max_tiles=1)
    torch.manual_seed(1)
    model = OmniModel(config)
    with torch.no_grad():
        for part in (model.vision_tower, model.multi_modal_projector):
            for name, p in part.named_parameters():
                scale = 0.3 if p.dim() > 1 else 0.1
                p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return Model(model, base.tokenizer, base.chat_template, name=f"tiny-{kind}")


@pytest.fixture(scope="module")
def text_gguf(tmp_path_factory):
    """One text GGUF for every llama.cpp run: mtmd only checks its width against the mmproj's."""
    return export_gguf(vision_model("internvl"), tmp_path_factory.mktemp("text") / "text.gguf", "f16")


def expected_tensors(model: Model) -> dict[str, tuple[int, ...]]:
    """clip.cpp's names and torch-order shapes for the model: the table the test holds the exporter to."""
    config = model.config
    v, d = config.vision, config.decoder.hidden_size
    kind = {"linear": "idefics3"}.get(config.vision_projector.kind, "internvl" if config.vision_projector.layer_norm
                                      else "mlp")
    blocks = max(k % (v.num_hidden_layers + 1) for k in v.feature_layers) if v.feature_layers else v.num_hidden_layers
    n = v.grid_size ** 2
    out = {"v.patch_embd.weight": (v.hidden_size, 3, v.patch_size, v.patch_size), "v.patch_embd.bias": (v.hidden_size,),
           "v.position_embd.weight": (n + v.use_cls_token, v.hidden_size)}
    if v.use_cls_token:
        out["v.class_embd"] = (1, v.hidden_size)
    if v.pre_layernorm:
        out |= {"v.pre_ln.weight": (v.hidden_size,), "v.pre_ln.bias": (v.hidden_size,)}
    if v.post_layernorm and not v.feature_layers:
        out |= {"v.post_ln.weight": (v.hidden_size,), "v.post_ln.bias": (v.hidden_size,)}
    for i in range(blocks):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            out |= {f"v.blk.{i}.{part}.weight": (v.hidden_size, v.hidden_size),
                    f"v.blk.{i}.{part}.bias": (v.hidden_size,)}
        out |= {f"v.blk.{i}.ffn_up.weight": (v.intermediate_size, v.hidden_size),
                f"v.blk.{i}.ffn_up.bias": (v.intermediate_size,),
                f"v.blk.{i}.ffn_down.weight": (v.hidden_size, v.intermediate_size),
                f"v.blk.{i}.ffn_down.bias": (v.hidden_size,)}
        for norm in ("ln1", "ln2"):
            out |= {f"v.blk.{i}.{norm}.weight": (v.hidden_size,), f"v.blk.{i}.{norm}.bias": (v.hidden_size,)}
        if v.layer_scale_init is not None:
            out |= {f"v.blk.{i}.ls1.weight": (v.hidden_size,), f"v.blk.{i}.ls2.weight": (v.hidden_size,)}
    merged = v.hidden_size * v.num_feature_layers * round(1 / config.vision_projector.downsample_ratio) ** 2
    if kind == "internvl":
        out |= {"mm.model.mlp.0.weight": (merged,), "mm.model.mlp.0.bias": (merged,),
                "mm.model.mlp.1.weight": (d, merged), "mm.model.mlp.1.bias": (d,),
                "mm.model.mlp.3.weight": (d, d), "mm.model.mlp.3.bias": (d,)}
    elif kind == "mlp":
        out |= {"mm.0.weight": (d, merged), "mm.0.bias": (d,), "mm.2.weight": (d, d), "mm.2.bias": (d,)}
    else:
        out["mm.model.fc.weight"] = (d, merged)
    return out


@pytest.mark.parametrize("kind", list(VISION))
def test_every_tensor_and_the_metadata_clip_cpp_needs(tmp_path, kind):
    model = vision_model(kind)
    reader = gguf.GGUFReader(export_mmproj(model, tmp_path / "mmproj.gguf", "f16"))
    for key in REQUIRED_KEYS:
        assert key in reader.fields, key
    fields = {name: reader.fields[name].contents() for name in reader.fields}
    v = model.config.vision
    assert fields["general.architecture"] == "clip"
    assert fields["clip.projector_type"] == kind
    assert fields["clip.vision.projection_dim"] == model.config.decoder.hidden_size
    assert fields["clip.vision.embedding_length"] == v.hidden_size
    assert fields["clip.vision.attention.head_count"] == v.num_attention_heads
    np.testing.assert_allclose(fields["clip.vision.image_mean"], v.image_mean, rtol=1e-6)
    np.testing.assert_allclose(fields["clip.vision.image_std"], v.image_std, rtol=1e-6)
    if kind == "mlp":
        assert fields["clip.vision.feature_layer"] == [0, 2]
        assert fields["clip.vision.block_count"] == 2  # the third block is never read
        assert "clip.use_gelu" not in fields and "clip.use_silu" not in fields  # quick GELU
    else:
        assert fields["clip.vision.projector.scale_factor"] == 2
        assert fields["clip.use_gelu"] is True
    tensors = {t.name: t for t in reader.tensors}
    expected = expected_tensors(model)
    assert set(tensors) == set(expected)
    for name, shape in expected.items():
        tensor = tensors[name]
        assert tuple(reversed(tensor.shape.tolist())) == shape, name  # GGUF lists ggml's order
        small = len(shape) == 1 or name in ("v.class_embd", "v.position_embd.weight")
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if small else gguf.GGMLQuantizationType.F16), name


def test_the_position_table_is_laid_out_as_clip_cpp_adds_it(tmp_path):
    """CLS row last (clip.cpp appends the CLS token), Idefics3's bucketed ids applied, in f32 to the bit."""
    for kind in ("internvl", "idefics3"):
        model = vision_model(kind)
        reader = gguf.GGUFReader(export_mmproj(model, tmp_path / f"{kind}.gguf", "f32"))
        tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
        ours = model.model.vision_tower.embeddings.position_embedding.weight.detach().numpy()
        if kind == "internvl":
            assert np.array_equal(tensors["v.position_embd.weight"], np.concatenate([ours[1:], ours[:1]]))
            cls = model.model.vision_tower.embeddings.class_embedding.detach().numpy()
            assert np.array_equal(tensors["v.class_embd"].reshape(-1), cls)
        else:
            from tinyomni.model.vision import bucketed_position_ids

            ids = bucketed_position_ids(4, 4, 4).numpy()
            assert np.array_equal(tensors["v.position_embd.weight"], ours[ids])


def test_an_earlier_feature_layer_exports_the_blocks_up_to_it_without_the_final_norm(tmp_path):
    model = vision_model("idefics3", num_hidden_layers=3, feature_layer=-2)
    reader = gguf.GGUFReader(export_mmproj(model, tmp_path / "m.gguf"))
    names = {t.name for t in reader.tensors}
    assert reader.fields["clip.vision.block_count"].contents() == 2
    assert "v.blk.1.ln1.weight" in names and "v.blk.2.ln1.weight" not in names
    assert "v.post_ln.weight" not in names


@pytest.mark.parametrize("changes,kind,reason", [
    (dict(conv_stem=(8, 16)), "idefics3", "conv_stem"),  # the reference model's stem
    (dict(use_cls_token=False), "internvl", "no CLS token"),
    (dict(use_cls_token=True), "mlp", "drops the first row"),
    (dict(intermediate_size=32), "mlp", "cannot tell fc1 from fc2"),
    (dict(qk_norm=True), "internvl", "qk_norm"),
    (dict(feature_layers=(2, 0)), "mlp", "increasing order"),
])
def test_what_clip_cpp_cannot_compute_is_refused_by_name(tmp_path, changes, kind, reason):
    if "conv_stem" in changes:
        changes = dict(changes, patch_size=4, image_size=16)
    model = vision_model(kind, **changes)
    with pytest.raises(InputError, match=reason):
        export_mmproj(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_the_reference_model_is_refused_for_its_conv_stem():
    """tinyomni-world's tower starts with a convolutional stem, which no clip.cpp graph has, and has no CLS
    token, which the InternVL graph (the one for its projector) needs: exactly these two reasons."""
    config = OmniConfig.load(Path(tinyomni.__file__).parent / "models" / "tinyomni-world" / "config.json")
    problems = mmproj_problems(config)
    assert len(problems) == 2 and "conv_stem" in problems[0] and "no CLS token" in problems[1]


def _mtmd_embeddings(text_gguf, mmproj, image: np.ndarray) -> np.ndarray:
    """The image embeddings llama.cpp's mtmd computes for one image (as llama-mtmd-cli would)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    llm = llama_cpp.Llama(str(text_gguf), n_ctx=128, verbose=False)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, "llama.cpp refused the mmproj"
    try:
        pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(image.shape[1], image.shape[0], pixels)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        text = mtmd_cpp.mtmd_input_text()
        text.text = mtmd_cpp.mtmd_default_marker()
        text.text_len, text.add_special, text.parse_special = len(text.text), False, True
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd_cpp.mtmd_encode_chunk(ctx, chunk) == 0
                out = np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),))
                result = out.reshape(n, -1).copy()
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        return result
    finally:
        mtmd_cpp.mtmd_free(ctx)
        llm.close()


@pytest.mark.parametrize("kind", list(VISION))
def test_llama_cpp_computes_our_image_embeddings(tmp_path, text_gguf, kind):
    pytest.importorskip("llama_cpp")
    model = vision_model(kind)
    mmproj = export_mmproj(model, tmp_path / "mmproj.gguf", "f32")
    # a tile-sized image: llama.cpp's preprocessing and ours then give the same pixels
    image = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    v = model.config.vision
    pixels = image_to_tensor([Image.fromarray(image)], SIDE, v.image_mean, v.image_std)
    with torch.no_grad():
        ours = model.model.encode_images(pixels)[0].numpy()
    theirs = _mtmd_embeddings(text_gguf, mmproj, image)
    assert theirs.shape == ours.shape
    # clip.cpp's GELUs are table-driven approximations (tanh form; erf in our projectors): measured 3.6e-4
    # (internvl), 1.2e-3 (idefics3), 1.8e-3 (mlp, quick GELU) of the largest value
    error = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert error < 3e-3, error
    # and each token is where ours is: a shifted or transposed layout is off by the size of the values
    nearest = [int(np.abs(theirs[i] - ours).max(-1).argmin()) for i in range(len(ours))]
    assert nearest == list(range(len(ours)))


def test_cli_writes_the_text_and_vision_files(tmp_path, capsys, monkeypatch):
    from tinyomni import api

    models = {"good": vision_model("internvl"), "bad": vision_model("internvl", use_cls_token=False)}
    monkeypatch.setattr(api, "load", lambda spec, **_: models[spec])  # the flags, not loading, are tested here
    code = main(["export", "good", "--to", "gguf", "--out", str(tmp_path / "t.gguf"), "--mmproj",
                 str(tmp_path / "v.gguf"), "--outtype", "f32"])
    assert code == 0
    vision = gguf.GGUFReader(tmp_path / "v.gguf")
    assert vision.fields["clip.projector_type"].contents() == "internvl"
    assert vision.fields["general.file_type"].contents() == 0  # f32, as the text file
    assert gguf.GGUFReader(tmp_path / "t.gguf").fields["general.architecture"].contents() == "llama"
    # a model clip.cpp cannot run writes neither file, and says why
    code = main(["export", "bad", "--out", str(tmp_path / "t2.gguf"), "--mmproj", str(tmp_path / "v2.gguf")])
    assert code != 0
    assert not (tmp_path / "t2.gguf").exists() and not (tmp_path / "v2.gguf").exists()
    assert "no CLS token" in capsys.readouterr().err
    assert main(["export", "good", "--to", "hf", "--out", str(tmp_path / "hf"), "--mmproj", "x.gguf"]) == 2
