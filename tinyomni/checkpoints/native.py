"""tinyomni's own checkpoint: a directory anyone can open.

    config.json          OmniConfig
    model.safetensors    weights (transformers-style names)
    tokenizer.json       + tokenizer_config.json (special ids)
    chat_template.jinja  the template chat uses
    generation_config.json  default sampling settings (optional; transformers' keys)
    quantization.json    only in a quantized checkpoint: which modules hold int8/int4 blocks
                         (engine/checkpoint.py; `tinyomni quantize` writes one)

A checkpoint built on a base decoder (`config.base_decoder`, e.g. "smollm2") may store only what is
not in the base: the encoders, projectors, and the embedding rows of the tokens it added. Writing is
atomic: a checkpoint directory is complete or absent, never half written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinyomni.config import OmniConfig
from tinyomni.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"  # default sampling settings, transformers' format
QUANTIZATION_FILE = "quantization.json"  # present in a quantized checkpoint (engine/checkpoint.py)
ADDED_ROWS = "language_model.model.embed_tokens.added_rows"  # rows past the base vocabulary


def atomic_directory(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and move the result to `path` in one rename; the old `path` is replaced
    only once the new one is complete, so an interruption leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for file in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_weights(directory: Path, state: dict[str, torch.Tensor], name: str = WEIGHTS_FILE,
                 dtype: torch.dtype | None = None) -> None:
    """Write `state`; with `dtype` (e.g. float16, half the size) its floating-point tensors in that type."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # safetensors refuses shared storage (tied weights); contiguous copies are what it stores anyway.
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / name),
              metadata={"format": "pt", "producer": "tinyomni"})


def copy_checkpoint(source: str | Path, dest: str | Path, weights_dtype: torch.dtype | None = None) -> Path:
    """Copy a checkpoint directory (atomically), optionally storing its floating-point weights in
    `weights_dtype` (float16 halves the size; loading casts back). How a trained model is shipped."""
    source = Path(source)
    read_config(source)

    def write(tmp: Path) -> None:
        for file in sorted(source.iterdir()):
            if file.suffix == ".safetensors" and weights_dtype is not None:
                save_weights(tmp, read_weights(source, file.name), file.name, weights_dtype)
            elif file.is_file():
                shutil.copy2(file, tmp / file.name)

    return atomic_directory(dest, write)


def read_config(path: Path) -> OmniConfig:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    return OmniConfig.load(path / CONFIG_FILE)


def read_weights(path: Path, name: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"weights file missing: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated ({e})") from None


def split_decoder(state: dict[str, torch.Tensor], base_vocab: int) -> dict[str, torch.Tensor]:
    """What to store when the decoder comes from a base: everything but `language_model.*`, plus the
    embedding rows of tokens the base does not have (and a visual expert's weights: no base has them)."""
    out = {k: v for k, v in state.items() if not k.startswith("language_model.") or ".visual_expert." in k}
    embed = state["language_model.model.embed_tokens.weight"]
    if embed.shape[0] > base_vocab:
        out[ADDED_ROWS] = embed[base_vocab:]
    return out


# torch.nn.init functions that modules call while they are built.
_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build modules without initialising their weights, which are about to be replaced by a
    checkpoint's: parameters stay `torch.empty` (memory reserved, never written, so never resident).

    Not the meta device: under `torch.device("meta")` every factory call goes through torch's Python
    reference ops, whose first use imports torch._dynamo (2-3 s of a 4 s start on this machine)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def check_replaced(model: torch.nn.Module, before: dict[str, int], where: str) -> None:
    """After `load_state_dict(..., assign=True)` into a `no_init` model: fail naming any stored tensor
    still the uninitialised one (`before`: its data pointers when built), never serve garbage."""
    left = [n for n, t in model.state_dict().items() if t.numel() and t.data_ptr() == before.get(n)]
    if left:
        raise CheckpointError(f"{where}: no weights for {_few(left)}")


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                allow_missing: Callable[[str], bool] = lambda k: False) -> None:
    """Fail with the names of missing/unexpected/mis-shaped tensors rather than load silently."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not allow_missing(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{where} does not fit its config: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_generation_config(path: Path) -> dict[str, Any]:
    """A checkpoint directory's default sampling settings (SamplingParams fields), {} without the file."""
    from tinyomni.generate import sampling_defaults

    file = Path(path) / GENERATION_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    try:
        return sampling_defaults(data, str(file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
