"""Export a model's vision side (tower + projector) as an mmproj GGUF: the file llama.cpp's `mtmd` / `clip.cpp`
loads beside the text GGUF (`llama-mtmd-cli -m text.gguf --mmproj vision.gguf`).

The file is llama.cpp's "clip" format: `general.architecture = "clip"`, `clip.projector_type` naming the
graph clip.cpp builds, the `clip.vision.*` sizes, image mean/std, and the tensors under its names
(`v.patch_embd`, `v.blk.N.attn_q`, ..., the projector's own). Three of clip.cpp's graphs compute what our
models compute; which one is picked from the projector, not from a name:

    projector                                   clip.projector_type  projector tensors
    LayerNorm → Linear → GELU → Linear (InternVL)   "internvl"        mm.model.mlp.{0,1,3}
    Linear → GELU → Linear, no norm (LLaVA)         "mlp"             mm.{0,2}
    one bias-free Linear (Idefics3 / SmolVLM)       "idefics3"        mm.model.fc

Each graph hard-codes parts of its family (InternVL's graph needs a CLS token and runs every block, the
Idefics3 graph has none, ...). What a graph cannot compute for a model is refused up front with every
reason named (`mmproj_problems`), never written as a file that answers differently. Notably the LLaVA
graph of this llama.cpp (llama-cpp-python 0.3.36) appends the CLS token after the patches and then keeps
rows 1..N, i.e. drops patch 0 and keeps the CLS token, so LLaVA-1.5's CLIP tower is refused; the "mlp"
type serves towers without a CLS token. Two things clip.cpp computes approximately, as it does for the upstream files:
its GELU is the tanh form (InternViT, CLIP and the projectors use erf GELU), and matrices are f16 unless
`--outtype f32`. Its image preprocessing is its own (InternVL tiles + thumbnail; Idefics3 splitting;
LLaVA pads to a square): an image already at the tile size becomes the same pixels as ours.

Three layout facts of clip.cpp that the tensors are written for (read from its graph code, checked
against llama-cpp-python's build in tests/test_export_mmproj.py):
- the CLS token is appended after the patches and the position table is added row by row, so the
  exported table holds the patch rows first and the CLS row last;
- Idefics3 / SmolVLM position ids are bucketed (see model/vision.py); on a full tile they are fixed, so
  the exported table is our table gathered by them;
- a hidden state other than the last one (`vision.feature_layer`) is exported as the first k blocks
  without the final norm (InternVL, Idefics3), or as clip.vision.feature_layer (LLaVA).

    tinyomni export MODEL --to mmproj --out vision.gguf [--outtype f16|f32]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tinyomni.checkpoints.export_gguf import write_atomically
from tinyomni.config import OmniConfig
from tinyomni.errors import InputError
from tinyomni.model.vision import bucketed_position_ids

if TYPE_CHECKING:
    from tinyomni.api import Model

OUT_TYPES = ("f32", "f16")
FILE_TYPES = {"f32": 0, "f16": 1}  # llama_ftype, as for the text GGUF
PROJECTOR_TYPES = ("internvl", "mlp", "idefics3")
# Our vision activation → clip.cpp's switch (clip.use_gelu / clip.use_silu; neither: quick GELU).
# clip.cpp's GELU is the tanh approximation, so "gelu" (erf) is approximate there, as upstream.
VISION_ACTS = {"gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu": "gelu", "quick_gelu": "quick",
               "silu": "silu"}
# clip.cpp runs InternViT-6B's RMSNorm only for that exact shape (width 3200, 45 blocks); every other
# InternVL tower is LayerNorm there.
INTERNVIT_6B = (3200, 45)

# Inside one block: our name (after "encoder.layers.N.") → clip.cpp's (after "v.blk.N.").
BLOCK_NAMES = {
    "layer_norm1.weight": "ln1.weight", "layer_norm1.bias": "ln1.bias",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.out_proj.weight": "attn_out.weight", "self_attn.out_proj.bias": "attn_out.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "layer_norm2.weight": "ln2.weight", "layer_norm2.bias": "ln2.bias",
    "mlp.fc1.weight": "ffn_up.weight", "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight", "mlp.fc2.bias": "ffn_down.bias",
    "ls1": "ls1.weight", "ls2": "ls2.weight",
}
# Outside the blocks (tower-relative); the position table and CLS token are placed by `_tower_tensors`.
TOWER_NAMES = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "pre_layernorm.weight": "v.pre_ln.weight", "pre_layernorm.bias": "v.pre_ln.bias",
    "post_layernorm.weight": "v.post_ln.weight", "post_layernorm.bias": "v.post_ln.bias",
}
# Our projector's names → clip.cpp's, per projector type.
PROJECTOR_NAMES = {
    "internvl": {"layer_norm.weight": "mm.model.mlp.0.weight", "layer_norm.bias": "mm.model.mlp.0.bias",
                 "linear_1.weight": "mm.model.mlp.1.weight", "linear_1.bias": "mm.model.mlp.1.bias",
                 "linear_2.weight": "mm.model.mlp.3.weight", "linear_2.bias": "mm.model.mlp.3.bias"},
    "mlp": {"linear_1.weight": "mm.0.weight", "linear_1.bias": "mm.0.bias",
            "linear_2.weight": "mm.2.weight", "linear_2.bias": "mm.2.bias"},
    "idefics3": {"proj.weight": "mm.model.fc.weight"},
}


def projector_type(config: OmniConfig) -> str:
    """Which clip.cpp graph computes this model's projector (see the module table)."""
    projector = config.vision_projector
    if projector.kind == "linear":
        return "idefics3"
    return "internvl" if projector.layer_norm else "mlp"


def mmproj_problems(config: OmniConfig) -> list[str]:
    """Everything in `config` that clip.cpp's graph for it would compute differently; empty: exportable."""
    vision = config.vision
    if vision is None:
        return ["the model has no vision tower"]
    kind = projector_type(config)
    projector = config.vision_projector
    problems = []
    if vision.conv_stem:
        problems.append(f"vision.conv_stem {list(vision.conv_stem)}: a convolutional stem (stride-2 convs with "
                        "BatchNorm and GELU) in place of the patch embedding; every clip.cpp graph starts with "
                        "one patch-size convolution")
    if vision.hidden_act not in VISION_ACTS:
        problems.append(f"vision.hidden_act {vision.hidden_act!r} (clip.cpp has {', '.join(VISION_ACTS)})")
    if vision.position_buckets and kind != "idefics3":
        problems.append("vision.position_buckets (Idefics3's position ids) outside an Idefics3 projector")
    if config.image_resize == "anyres":  # clip.cpp's LLaVA-NeXT graph needs its grid metadata, not written here
        problems.append("image_resize 'anyres' (LLaVA-NeXT's grid, unpadding and image_newline are not written "
                        "to an mmproj file yet)")
    if vision.num_channels != 3:
        problems.append(f"vision.num_channels {vision.num_channels} (clip.cpp reads RGB)")
    shape_6b = (vision.hidden_size, vision.num_hidden_layers) == INTERNVIT_6B
    if kind == "internvl" and shape_6b != (vision.norm_type == "rms_norm"):
        problems.append(f"vision.norm_type {vision.norm_type} for a {vision.hidden_size}-wide, "
                        f"{vision.num_hidden_layers}-block tower (clip.cpp uses RMSNorm exactly for InternViT-6B's "
                        "3200 x 45 shape, LayerNorm otherwise)")
    elif kind != "internvl" and vision.norm_type != "layer_norm":
        problems.append(f"vision.norm_type {vision.norm_type} (clip.cpp's {kind} graph uses LayerNorm)")
    if vision.qk_norm and not (kind == "internvl" and shape_6b):
        problems.append("vision.qk_norm (clip.cpp normalises q/k with the tower's norm, RMSNorm only for InternViT-6B)")
    if kind in ("internvl", "idefics3"):
        if vision.feature_layers:
            problems.append(f"vision.feature_layers {list(vision.feature_layers)} (the {kind} graph reads one layer)")
        if vision.feature_select != "patches":
            problems.append(f"vision.feature_select {vision.feature_select!r} (the {kind} graph keeps the patches)")
    if kind == "internvl":
        if not vision.use_cls_token:
            problems.append("no CLS token (clip.cpp's InternVL graph needs one, as InternViT has)")
        if config.max_tiles > 1 and not config.use_thumbnail:
            problems.append("use_thumbnail false with several tiles (llama.cpp adds InternVL's thumbnail)")
    if kind == "idefics3":
        if vision.use_cls_token:
            problems.append("a CLS token (clip.cpp's Idefics3 graph is SigLIP's, without one)")
        if config.image_resize == "longest_edge" and not config.image_splitting:
            problems.append("image_splitting false (llama.cpp's Idefics3 preprocessing splits large images)")
    if kind == "mlp":
        if vision.use_cls_token:
            # Measured with llama-cpp-python 0.3.36: its LLaVA graph appends the CLS token after the patches,
            # then keeps rows 1..N, so it returns patches 1..N-1 and the CLS token, not patches 0..N-1.
            problems.append("a CLS token with a LLaVA projector: llama.cpp's LLaVA graph appends the CLS token "
                            "after the patches and then drops the first row, so it would feed the decoder "
                            "patches 1..N-1 and the CLS token instead of patches 0..N-1")
        if vision.layer_scale_init is not None:
            problems.append("layer scale (ls1/ls2): clip.cpp's LLaVA graph has none")
        if vision.feature_select == "drop_first":
            problems.append("vision.feature_select 'drop_first' (clip.cpp's LLaVA graph keeps every patch)")
        layers = [k % (vision.num_hidden_layers + 1) for k in vision.feature_layers]
        if layers and (layers != sorted(set(layers))):
            problems.append(f"vision.feature_layers {list(vision.feature_layers)}: clip.cpp concatenates the "
                            "layers in increasing order, each once")
        if projector.hidden_act != "gelu":
            problems.append(f"projector hidden_act {projector.hidden_act!r} (clip.cpp's LLaVA projector is GELU)")
    if kind == "internvl" and projector.hidden_act != "gelu":
        problems.append(f"projector hidden_act {projector.hidden_act!r} (clip.cpp's InternVL projector is GELU)")
    if kind in ("internvl", "idefics3") and projector.downsample_ratio == 1:
        problems.append("no pixel shuffle (downsample_ratio 1): clip.cpp's graph always merges patches")
    if kind == "mlp" and projector.downsample_ratio != 1:
        problems.append(f"pixel shuffle {projector.downsample_ratio} with a LLaVA projector (clip.cpp has none there)")
    if kind in ("mlp", "idefics3") and vision.intermediate_size == vision.hidden_size:
        # clip.cpp swaps ffn_up/ffn_down of these graphs when ffn_down looks like an old file's (its rows
        # are the width); with a square MLP it cannot tell, and would swap ours.
        problems.append(f"vision.intermediate_size == hidden_size ({vision.hidden_size}): clip.cpp's {kind} "
                        "loader cannot tell fc1 from fc2")
    return problems


def export_mmproj(model: Model, path: str | Path, outtype: str = "f16") -> Path:
    """Write `model`'s vision tower and projector to `path` as llama.cpp's mmproj GGUF, atomically."""
    import gguf

    if outtype not in OUT_TYPES:
        raise InputError(f"unknown mmproj outtype {outtype!r}; use one of {', '.join(OUT_TYPES)}")
    config = model.config
    problems = mmproj_problems(config)
    if problems:
        raise InputError(f"{model.name} cannot be written as a llama.cpp mmproj: {'; '.join(problems)}")
    vision, kind = config.vision, projector_type(config)
    assert vision is not None
    tensors = mmproj_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, "clip")
    writer.add_name(Path(str(model.name)).name or "tinyomni")
    writer.add_description(f"vision tower and {kind} projector of {model.name}, exported by tinyomni")
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(kind)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(exported_blocks(config))
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_projection_dim(config.decoder.hidden_size)
    writer.add_vision_image_mean([float(m) for m in vision.image_mean])
    writer.add_vision_image_std([float(s) for s in vision.image_std])
    act = VISION_ACTS[vision.hidden_act]
    if act == "gelu":
        writer.add_vision_use_gelu(True)
    elif act == "silu":
        writer.add_vision_use_silu(True)
    if kind in ("internvl", "idefics3"):
        writer.add_vision_projector_scale_factor(round(1 / config.vision_projector.downsample_ratio))
    if kind == "internvl":
        writer.add_vision_preproc_min_tiles(config.min_tiles)
        writer.add_vision_preproc_max_tiles(config.max_tiles)
    if kind == "idefics3":
        writer.add_vision_preproc_image_size(config.image_longest_edge or vision.image_size)
    if kind == "mlp":
        # non-negative hidden_states indices (clip.cpp's convention: -1 marks "unset" there)
        total = vision.num_hidden_layers + 1
        writer.add_array("clip.vision.feature_layer", [k % total for k in
                                                       (vision.feature_layers or (vision.feature_layer,))])
    for name, tensor in tensors.items():
        _add_tensor(writer, name, tensor, outtype)
    return write_atomically(writer, tmp, path)


def exported_blocks(config: OmniConfig) -> int:
    """How many tower blocks the file holds: InternVL and Idefics3 graphs run all of them, so a hidden
    state before the last is exported as the blocks up to it; LLaVA's graph stops at its feature layer."""
    vision = config.vision
    assert vision is not None
    total = vision.num_hidden_layers + 1
    if projector_type(config) == "mlp":
        return max(k % total for k in (vision.feature_layers or (vision.feature_layer,)))
    return vision.num_hidden_layers if vision.feature_layer == -1 else vision.feature_layer % total


def _uses_post_norm(config: OmniConfig) -> bool:
    vision = config.vision
    assert vision is not None
    return vision.post_layernorm and vision.feature_layer == -1 and not vision.feature_layers


def mmproj_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The tower's and projector's float32 weights under clip.cpp's names, laid out as its graph reads them."""
    config = model.config
    kind = projector_type(config)
    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    assert tower is not None and projector is not None and config.vision is not None
    out = _tower_tensors({k: v.detach().float().cpu() for k, v in tower.state_dict().items()}, config)
    names = PROJECTOR_NAMES[kind]
    for name, tensor in projector.state_dict().items():
        if name not in names:
            raise InputError(f"no clip.cpp name for projector tensor {name!r} ({kind} projector)")
        out[names[name]] = tensor.detach().float().cpu()
    return out


def _tower_tensors(state: dict[str, torch.Tensor], config: OmniConfig) -> dict[str, torch.Tensor]:
    vision = config.vision
    assert vision is not None
    blocks = exported_blocks(config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers."):].split(".", 1)
            if int(index) >= blocks:
                continue  # past the feature layer: never run
            if rest not in BLOCK_NAMES:
                raise InputError(f"no clip.cpp name for vision tensor {name!r}")
            out[f"v.blk.{index}.{BLOCK_NAMES[rest]}"] = tensor
        elif name.startswith("post_layernorm.") and not _uses_post_norm(config):
            continue  # the feature layer is read before the final norm
        elif name in TOWER_NAMES:
            out[TOWER_NAMES[name]] = tensor
        elif name not in ("embeddings.class_embedding", "embeddings.position_embedding.weight"):
            raise InputError(f"no clip.cpp name for vision tensor {name!r}")
    positions = state["embeddings.position_embedding.weight"]
    if vision.use_cls_token:
        # clip.cpp appends the CLS token after the patches and adds the table row by row.
        out["v.class_embd"] = state["embeddings.class_embedding"].reshape(1, -1)
        positions = torch.cat([positions[1:], positions[:1]])
    if vision.position_buckets:
        side = vision.grid_size
        positions = positions[bucketed_position_ids(side, side, side)]
    out["v.position_embd.weight"] = positions.contiguous()
    return out


def _add_tensor(writer, name: str, tensor: torch.Tensor, outtype: str) -> None:
    data = tensor.numpy()
    # norms, biases, layer scales, the CLS token and the position table stay float32, as upstream files
    # keep them (clip.cpp adds them to float32 activations)
    small = data.ndim == 1 or name in ("v.class_embd", "v.position_embd.weight")
    if small or outtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    else:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
