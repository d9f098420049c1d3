"""Training checkpoints: everything a run needs to continue as if it had never stopped.

    <out>/checkpoints/step-0000200/
        weights.safetensors    the parameters trained so far (the rest is rebuilt from the recipe)
        optimizer.pt           AdamW moments of the current stage
        rng.pt                 torch / python / numpy random states
        state.json             stage, step, which parameters were trained, the recipe

Each is written with `atomic_directory`: a checkpoint is complete or absent, so killing the run
during a write leaves the previous one as the latest.

Under FSDP (`run.distributed = "fsdp"`) a checkpoint is sharded instead: every process writes its
shards of the same weights and optimizer state with torch.distributed.checkpoint (`.metadata`,
`__<rank>_0.distcp`), beside rng.pt and state.json (`"format": "sharded"`). Either kind resumes either
way: a run without FSDP reads a sharded checkpoint consolidated in memory, an FSDP run shards a full
one, and `python -m tinyomni.train.consolidate SRC DST` writes a sharded checkpoint as a
full one (weights.safetensors, optimizer.pt by parameter name).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyomni.checkpoints import native
from tinyomni.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{7})$")


@dataclass
class TrainState:
    stage: int  # index of the stage this checkpoint is in
    step: int  # optimizer steps done in that stage (== its steps: the stage is finished)
    global_step: int  # steps done over all stages
    trained: list[str]  # parameter names trained in any stage so far (what weights.safetensors holds)


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones are hidden temp dirs, never listed)."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def remove_stale(out: Path) -> None:
    """Temp dirs left by a run killed during a write."""
    folder = checkpoint_dir(out)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out: Path, state: TrainState, weights: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    recipe: dict[str, Any], keep: int) -> Path:
    def write(tmp: Path) -> None:
        native.save_weights(tmp, weights, "weights.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        _write_rng(tmp)
        (tmp / "state.json").write_text(json.dumps({**state.__dict__, "recipe": recipe}, indent=1) + "\n")

    path = native.atomic_directory(checkpoint_dir(out) / f"step-{state.global_step:07d}", write)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any]]:
    """(state, weights, optimizer state); also restores the random states. A sharded checkpoint is
    consolidated in memory (optimizer state by parameter name)."""
    if is_sharded(path):
        weights, optimizer = read_sharded(path)
    else:
        try:
            optimizer = torch.load(path / "optimizer.pt", weights_only=False)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable training checkpoint ({e})") from None
        weights = native.read_weights(path, "weights.safetensors")
    state = read_state(path)
    restore_rng(path)
    return state, weights, optimizer


def _meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({e})") from None


def read_state(path: Path) -> TrainState:
    meta = _meta(path)
    return TrainState(meta["stage"], meta["step"], meta["global_step"], meta["trained"])


def restore_rng(path: Path) -> None:
    try:
        rng = torch.load(path / "rng.pt", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({e})") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def _write_rng(folder: Path) -> None:
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               folder / "rng.pt")


# --- optimizer state by position or by name ------------------------------------------------------

def optimizer_by_name(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """torch's optimizer state (parameters by position in the groups) keyed by parameter name instead,
    as torch.distributed.checkpoint keeps it; `order` names the parameters in position order. A state
    keyed by name already is returned as it is."""
    if _by_name(state):
        return state
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_by_position(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The inverse of optimizer_by_name: what `torch.optim.Optimizer.load_state_dict` takes."""
    if not _by_name(state):
        return state
    index = {name: i for i, name in enumerate(order)}
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise CheckpointError(f"optimizer state for parameters this stage does not train: {unknown[:3]}")
    return {"state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict[str, Any]) -> bool:
    groups = state.get("param_groups") or [{}]
    return any(isinstance(p, str) for g in groups for p in g.get("params", []))


# --- sharded checkpoints (FSDP) ------------------------------------------------------------------

def is_sharded(path: Path) -> bool:
    return _meta(path).get("format") == "sharded"


def save_sharded_checkpoint(out: Path, state: TrainState, weights: dict[str, Any], optimizer: dict[str, Any],
                            recipe: dict[str, Any], keep: int, main: bool) -> Path:
    """Every process calls this with its shards (DTensors); the main process picks the temp folder,
    writes rng.pt and state.json and renames the folder when all shards are on disk. Needs a folder
    every process can reach (a shared file system across machines)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    def shards(tmp: Path | None) -> Path:
        box = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(box, src=0)
        folder = Path(box[0])
        dcp.save({"model": weights, "optim": optimizer}, checkpoint_id=str(folder))  # collective
        return folder

    def write(tmp: Path) -> None:
        shards(tmp)
        _write_rng(tmp)
        meta = {**state.__dict__, "format": "sharded", "weights": sorted(weights), "recipe": recipe}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")

    path = checkpoint_dir(out) / f"step-{state.global_step:07d}"
    if main:
        native.atomic_directory(path, write)
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    else:
        shards(None)
    return path


class ShardedOptimizer:
    """The optimizer shards of a sharded checkpoint, read once the optimizer exists to take them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load_into(self, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load({"optim": state}, checkpoint_id=str(self.path))


def load_sharded_checkpoint(path: Path, own: dict[str, torch.Tensor]) -> tuple[TrainState, dict[str, Any],
                                                                            ShardedOptimizer]:
    """Under FSDP: this process's shards of the weights, read into tensors laid out like `own` (the
    model's state dict; `reference.X` like X), and the optimizer shards to read later."""
    import torch.distributed.checkpoint as dcp

    keys = _meta(path)["weights"]
    weights = {k: own[k.removeprefix("reference.")].detach().clone() for k in keys}
    dcp.load({"model": weights}, checkpoint_id=str(path))
    state = read_state(path)
    restore_rng(path)
    return state, weights, ShardedOptimizer(path)


def read_sharded(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A sharded checkpoint's full weights and optimizer state (by name), in one process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), str(Path(tmp) / "full.pt"))
        full = torch.load(Path(tmp) / "full.pt", weights_only=False)
    return full["model"], full["optim"]


def consolidate(src: Path, dst: Path) -> Path:
    """Write sharded checkpoint `src` as a full one at `dst` (a run without FSDP resumes from it as
    from its own; so does an FSDP run, with any number of processes)."""
    weights, optimizer = read_sharded(src)
    meta = _meta(src)
    meta.pop("weights", None)
    meta["format"] = "full"

    def write(tmp: Path) -> None:
        native.save_weights(tmp, weights, "weights.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        shutil.copy(src / "rng.pt", tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")

    return native.atomic_directory(dst, write)
