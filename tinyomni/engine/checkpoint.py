"""Saved quantized checkpoints: the engine's int8/int4 blocks on disk, loaded as they are.

A quantized checkpoint is a tinyomni checkpoint directory (config.json, tokenizer, chat template,
generation config) whose `model.safetensors` holds each quantized linear's packed buffers
(`<module>.qweight`, `.scales`, `.mins`, `.bias`) in place of its float weight, next to the float
tensors left (norms, and the vision and audio towers unless they were quantized too), plus
`quantization.json`:

    {"format": "tinyomni-quantized", "version": 2,
     "mode": "int4",                                   # what was asked for (a layer may differ, e.g. Q8_0)
     "layouts": {"int4": "<hash>", ...},               # the packed layout each kind was written in
     "linears": {"language_model.lm_head": {"kind": "int4", "in_features": 576, "out_features": 49152,
                                             "activations": "int8x2", "bias": false},
                 "language_model.model.layers.0.self_attn.q_proj": {..., "lora": {"r": 16, "scaling": 2.0}},
                 ...},
     "embeddings": {"language_model.model.embed_tokens": {"table": "language_model.lm_head",
                                                          "dtype": "float32"}}}

A linear with "lora" is a `LoRAQuantLinear` (engine/lora.py): its blocks plus a float adapter,
`<module>.lora_A` [r, in] and `<module>.lora_B` [out, r], kept apart rather than merged and
requantized. Version 1 (before adapters) holds the same minus "lora", and is still read.

Loading builds the model without initialising it (native.no_init), then puts a QuantLinear around
each module's tensors straight from the mmap'd file: no float copy of a quantized weight is ever
made, and the file's pages are what the process holds. A checkpoint written by another format
version, or with a packed layout this engine no longer uses (a layout hash that differs from the one
computed here, see `layout_signature`), is refused by name: quantize the float model again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tinyomni.checkpoints import native
from tinyomni.config import OmniConfig
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref
from tinyomni.engine.lora import LoRAQuantLinear
from tinyomni.engine.modules import ACTIVATIONS, KINDS, QuantEmbedding, QuantLinear
from tinyomni.errors import CheckpointError
from tinyomni.model.omni import OmniModel

SPEC_FILE = native.QUANTIZATION_FILE
FORMAT = "tinyomni-quantized"
VERSION = 2  # bump when what the files hold changes (names, the JSON's fields); 2 added "lora"
READABLE = (1, 2)  # versions this engine loads: 1 is 2 without adapters
BUFFERS = ("qweight", "scales", "mins")
_REFERENCES = {"int4": int4_ref, "int8": int8_ref}


def is_quantized(path: str | Path) -> bool:
    """Whether a checkpoint directory holds a quantized model."""
    return (Path(path) / SPEC_FILE).is_file()


@functools.cache
def layout_signature(kind: str) -> str:
    """A hash of how `kind` packs a fixed small weight (odd row count, two blocks): it changes
    whenever the packed layout the kernels read changes, so a stale file is refused, never misread."""
    ref = _REFERENCES[kind]
    weight = (torch.arange(19 * 64, dtype=torch.float32).view(19, 64) * 0.37).sin()
    digest = hashlib.sha256()
    for t in ref.pack(*ref.quantize_codes(weight)):
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@functools.cache
def _row_group_shapes(kind: str, blocks: int) -> tuple[tuple[int, ...], ...]:
    """The packed shapes of (qweight, scales, mins) for one group of rows of `blocks` blocks: a weight
    of N rows packs to ceil(N / ROWS) such groups along the first dimension."""
    ref = _REFERENCES[kind]
    codes = torch.zeros(1, blocks, 32, dtype=torch.uint8)
    zeros = torch.zeros(1, blocks, dtype=torch.int16)
    return tuple(tuple(t.shape[1:]) for t in ref.pack(codes, zeros, zeros))


# --- writing ---------------------------------------------------------------------------------------
def quantized_state(model: nn.Module, mode: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """What to write for a quantized model: its tensors (each once; a QuantEmbedding's table is its
    LM head's, stored under the head's name) and the spec that says which modules are quantized."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared layer under each of its names
    linears: dict[str, Any] = {}
    embeddings: dict[str, Any] = {}
    shared: set[str] = set()  # state-dict prefixes that repeat another module's buffers
    for name, module in modules.items():
        if isinstance(module, QuantEmbedding):
            table = next((n for n, m in modules.items() if m is module.table and not n.startswith(f"{name}.")), None)
            if table is None:
                raise CheckpointError(f"{name}: a quantized embedding whose table is not also a layer of the "
                                      "model cannot be saved")
            embeddings[name] = {"table": table, "dtype": str(module.weight.dtype).replace("torch.", "")}
            shared.add(f"{name}.table.")
        elif isinstance(module, QuantLinear):
            if any(name.startswith(f"{e}.table") for e in embeddings):
                continue  # the LM head's blocks, seen under the embedding's name too
            linears[name] = {"kind": module.kind, "in_features": module.in_features,
                             "out_features": module.out_features, "activations": module.activations,
                             "bias": module.bias is not None}
            if isinstance(module, LoRAQuantLinear):  # its lora_A / lora_B buffers are in the state dict
                linears[name]["lora"] = {"r": module.r, "scaling": module.scaling}
        elif hasattr(module, "lora_A"):
            raise CheckpointError(f"{name}: a model with LoRA layers cannot be saved quantized; merge them first")
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in shared)}
    spec = {"format": FORMAT, "version": VERSION, "mode": mode,
            "layouts": {kind: layout_signature(kind) for kind in sorted({e["kind"] for e in linears.values()})},
            "linears": linears, "embeddings": embeddings}
    return state, spec


def write(model: nn.Module, directory: Path, mode: str, dtype: torch.dtype | None = None) -> None:
    """The weights file and quantization.json of a quantized model into `directory` (config, tokenizer
    and template are the caller's, as for a float checkpoint). `dtype` casts the float tensors left."""
    state, spec = quantized_state(model, mode)
    native.save_weights(directory, state, dtype=dtype)  # packed codes are integers: never cast
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")


# --- reading ---------------------------------------------------------------------------------------
def read_spec(path: Path) -> dict[str, Any]:
    """quantization.json, checked: a format, version, kind or layout this engine does not read is an error."""
    file = Path(path) / SPEC_FILE
    try:
        spec = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a tinyomni quantized-checkpoint description "
                              f"(expected \"format\": \"{FORMAT}\")")
    if spec.get("version") not in READABLE:
        raise CheckpointError(f"{file}: quantized-checkpoint format version {spec.get('version')!r}, but this "
                              f"tinyomni reads versions {', '.join(map(str, READABLE))}; quantize the float "
                              "model again (tinyomni quantize MODEL --bits 4 --out DIR)")
    linears, embeddings = spec.get("linears"), spec.get("embeddings", {})
    if not isinstance(linears, dict) or not isinstance(embeddings, dict) or not isinstance(spec.get("layouts"), dict):
        raise CheckpointError(f"{file}: \"linears\", \"embeddings\" and \"layouts\" must be JSON objects")
    for name, entry in linears.items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in KINDS:
            raise CheckpointError(f"{file}: {name} has quantized kind {kind!r}, which this engine does not know "
                                  f"(known: {', '.join(KINDS)})")
        if entry.get("activations") not in ACTIVATIONS:
            raise CheckpointError(f"{file}: {name} has activation format {entry.get('activations')!r} "
                                  f"(known: {', '.join(ACTIVATIONS)})")
        for field in ("in_features", "out_features"):
            if not isinstance(entry.get(field), int) or entry[field] <= 0:
                raise CheckpointError(f"{file}: {name}.{field} must be a positive integer")
        if "lora" in entry:
            adapter = entry["lora"]
            if (spec["version"] < 2 or not isinstance(adapter, dict) or not isinstance(adapter.get("r"), int)
                    or adapter["r"] <= 0 or not isinstance(adapter.get("scaling"), (int, float))):
                raise CheckpointError(f"{file}: {name}.lora must be {{\"r\": a positive integer, \"scaling\": a "
                                      "number}} (in a version 2 file)")
    for kind in {e["kind"] for e in linears.values()}:
        if spec["layouts"].get(kind) != layout_signature(kind):
            raise CheckpointError(f"{file}: its {kind} blocks were packed in a layout this engine no longer "
                                  f"reads (layout {spec['layouts'].get(kind)!r}, this engine's "
                                  f"{layout_signature(kind)!r}); quantize the float model again")
    for name, entry in embeddings.items():
        if not isinstance(entry, dict) or entry.get("table") not in linears:
            raise CheckpointError(f"{file}: embedding {name} must name one of the quantized linears as its table")
        if entry.get("dtype") not in ("float32", "bfloat16", "float16"):
            raise CheckpointError(f"{file}: embedding {name} has dtype {entry.get('dtype')!r}")
    return spec


def _buffers(state: dict[str, Tensor], name: str, entry: dict[str, Any], where: str) -> list[Tensor | None]:
    """A quantized linear's tensors from the file, checked against the shapes its features imply."""
    kind, n, k = entry["kind"], entry["out_features"], entry["in_features"]
    groups = -(-n // _REFERENCES[kind].ROWS)
    found: list[Tensor | None] = []
    for buffer, shape, dtype in zip(BUFFERS, _row_group_shapes(kind, -(-k // 32)), (torch.uint8, torch.int16,
                                                                                     torch.int16)):
        t = state.pop(f"{name}.{buffer}", None)
        if t is None:
            raise CheckpointError(f"{where}: {name}.{buffer} is missing")
        if t.dtype != dtype or tuple(t.shape) != (groups, *shape):
            raise CheckpointError(f"{where}: {name}.{buffer} is {t.dtype} {tuple(t.shape)}, but a {kind} layer of "
                                  f"{k} -> {n} features needs {dtype} {(groups, *shape)}")
        found.append(t)
    bias = state.pop(f"{name}.bias", None)
    if entry.get("bias") and (bias is None or tuple(bias.shape) != (n,)):
        raise CheckpointError(f"{where}: {name}.bias is missing or not of {n} values")
    if bias is not None and not entry.get("bias"):
        raise CheckpointError(f"{where}: {name}.bias is in the weights but quantization.json says it has none")
    return [*found, bias]


def _adapter(state: dict[str, Tensor], name: str, entry: dict[str, Any], where: str) -> tuple[Tensor, Tensor]:
    """A LoRA linear's lora_A [r, in] and lora_B [out, r] from the file, checked."""
    r, n, k = entry["lora"]["r"], entry["out_features"], entry["in_features"]
    found = []
    for buffer, shape in (("lora_A", (r, k)), ("lora_B", (n, r))):
        t = state.pop(f"{name}.{buffer}", None)
        if t is None:
            raise CheckpointError(f"{where}: {name}.{buffer} is missing (quantization.json gives it an adapter)")
        if not t.is_floating_point() or tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: {name}.{buffer} is {t.dtype} {tuple(t.shape)}, but a rank-{r} "
                                  f"adapter of {k} -> {n} features needs a float {shape}")
        found.append(t)
    return found[0], found[1]


def _swap(root: nn.Module, name: str, new: nn.Module, where: str) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
    except AttributeError:
        raise CheckpointError(f"{where}: quantization.json names {name}, which the model has not") from None
    if not isinstance(old, (nn.Linear, nn.Embedding)):
        raise CheckpointError(f"{where}: {name} is a {type(old).__name__}, not a layer that can be quantized")
    setattr(parent, child, new)


def load(path: Path, config: OmniConfig | None = None) -> tuple[OmniModel, dict[str, Any]]:
    """A quantized checkpoint's model (every tensor the file's own, mmap'd) and its spec."""
    path = Path(path)
    spec = read_spec(path)
    config = config or native.read_config(path)
    where = str(path)
    state = native.read_weights(path)
    with native.no_init():
        model = OmniModel(config)
    for name, entry in spec["linears"].items():
        qweight, scales, mins, bias = _buffers(state, name, entry, where)
        linear = QuantLinear(entry["kind"], qweight, scales, mins, bias, entry["in_features"],
                             entry["out_features"], entry["activations"])
        if "lora" in entry:
            linear = LoRAQuantLinear(linear, *_adapter(state, name, entry, where), entry["lora"]["scaling"])
        _swap(model, name, linear, where)
    for name, entry in spec["embeddings"].items():
        table = model.get_submodule(entry["table"])
        _swap(model, name, QuantEmbedding(table, getattr(torch, entry["dtype"])), where)
    # The float tensors left (norms, towers, an untied embedding): as a float checkpoint's.
    tables = tuple(f"{name}.table." for name in spec["embeddings"])
    quantized = {f"{name}.{b}" for name in spec["linears"] for b in (*BUFFERS, "bias", "lora_A", "lora_B")}
    native.check_state(model, state, where, allow_missing=lambda k: k.startswith(tables) or k in quantized)
    before = {n: t.data_ptr() for n, t in model.state_dict().items() if n not in quantized and not n.startswith(tables)}
    model.load_state_dict(state, strict=False, assign=True)
    native.check_replaced(model, before, where)
    from tinyomni.engine import fused

    fused.install(model.language_model)  # the one-call decode step, as quantize_model gives a fresh model
    return model, spec
