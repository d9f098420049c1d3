"""Training checkpoints: everything a run needs to continue as if it had never stopped.

    <out>/checkpoints/step-0000200/
        weights.safetensors    the parameters trained so far (the rest is rebuilt from the recipe)
        optimizer.pt           AdamW moments of the current stage
        rng.pt                 torch / python / numpy random states
        state.json             stage, step, which parameters were trained, the recipe

Each is written with `atomic_directory`: a checkpoint is complete or absent, so killing the run
during a write leaves the previous one as the latest.
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
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state.__dict__, "recipe": recipe}, indent=1) + "\n")

    path = native.atomic_directory(checkpoint_dir(out) / f"step-{state.global_step:07d}", write)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any]]:
    """(state, weights, optimizer state); also restores the random states."""
    try:
        meta = json.loads((path / "state.json").read_text())
        rng = torch.load(path / "rng.pt", weights_only=False)
        optimizer = torch.load(path / "optimizer.pt", weights_only=False)
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({e})") from None
    weights = native.read_weights(path, "weights.safetensors")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    state = TrainState(meta["stage"], meta["step"], meta["global_step"], meta["trained"])
    return state, weights, optimizer
