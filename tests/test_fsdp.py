"""FSDP (`run.distributed = "fsdp"`, torch.distributed.fsdp.fully_shard) with 2 gloo CPU processes:
the same losses as 1 process at the same global batch, sharded checkpoints (torch.distributed.checkpoint)
that resume under FSDP, consolidate into a full checkpoint that 1 process resumes, and the other way;
DPO under FSDP too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinyomni
from tinyomni.errors import ConfigError
from tinyomni.train import checkpoint as ckpt
from tinyomni.train import load_recipe, train
from tinyomni.train.checkpoint import consolidate

ROOT = Path(__file__).resolve().parents[1]

SFT = """
name = "fsdp-sft"
[model]
base = "tiny"
[run]
autocast = "none"
save_every = 2
log_every = 1
distributed = "fsdp"
[[stages]]
name = "instruct"
kind = "sft"
steps = 3
batch_size = 4
micro_batch_size = 1
lr = 3e-3
module_lr = { multi_modal_projector = 1e-2, lora = 5e-3 }
train = ["multi_modal_projector", "language_model.model.norm"]
lora = { r = 4, alpha = 8, targets = ["q_proj", "v_proj"] }
max_tiles = 1
data = { skills = ["color", "shape"], difficulty = { image_size = 56 } }
"""


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory) -> str:
    return str(tiny.save(tmp_path_factory.mktemp("tiny") / "tiny"))


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def torchrun(recipe: Path, out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tinyomni.train.cli", str(recipe), "--no-progress", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def copy_checkpoint(src_run: Path, step: str, dst_run: Path) -> None:
    """A run folder that holds only `step` of another run (and its log up to there)."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / step, dst_run / "checkpoints" / step)
    shutil.copy(src_run / "log.jsonl", dst_run / "log.jsonl")


def test_fsdp_two_processes_match_one_and_checkpoints_go_both_ways(tiny_dir, tmp_path):
    recipe = tmp_path / "sft.toml"
    recipe.write_text(SFT)
    base = f'model.base="{tiny_dir}"'
    one = train(load_recipe(recipe, [base, f'run.out="{tmp_path / "one"}"']), progress=False)
    expected = losses(tmp_path / "one")
    assert len(expected) == 3

    # Two processes, stopped after step 2 (a sharded checkpoint), then resumed under FSDP.
    torchrun(recipe, tmp_path / "two", "--set", base, "--stop-after", "2")
    sharded = tmp_path / "two" / "checkpoints" / "step-0000002"
    assert ckpt.is_sharded(sharded)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in sharded.iterdir()}
    assert not (sharded / "weights.safetensors").exists()
    torchrun(recipe, tmp_path / "two", "--set", base, "--resume")
    assert losses(tmp_path / "two") == pytest.approx(expected, rel=1e-5)
    # The final model gathered from the shards is the one process's model.
    a, b = tinyomni.load(one.model_dir).model.state_dict(), tinyomni.load(tmp_path / "two" / "model").model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # Sharded -> full: consolidated, one process continues from it.
    copy_checkpoint(tmp_path / "two", "step-0000002", tmp_path / "full")
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "step-0000002")
    consolidate(sharded, tmp_path / "full" / "checkpoints" / "step-0000002")
    state, weights, optimizer = ckpt.load_checkpoint(tmp_path / "full" / "checkpoints" / "step-0000002")
    assert state.global_step == 2 and any("lora_B" in k for k in weights) and optimizer["state"]
    train(load_recipe(recipe, [base, f'run.out="{tmp_path / "full"}"', "run.distributed=ddp"]), progress=False,
          resume=True)
    assert losses(tmp_path / "full") == pytest.approx(expected, rel=1e-5)

    # Full -> sharded: two FSDP processes continue from the one process's checkpoint.
    copy_checkpoint(tmp_path / "one", "step-0000002", tmp_path / "back")
    torchrun(recipe, tmp_path / "back", "--set", base, "--resume")
    assert losses(tmp_path / "back") == pytest.approx(expected, rel=1e-5)
    assert ckpt.is_sharded(tmp_path / "back" / "checkpoints" / "step-0000003")


def test_dpo_under_fsdp_matches_one_process(tiny_dir, tmp_path):
    # sft with LoRA, then dpo on the same adapters: the reference (a copy of the adapters as dpo
    # began) is swapped into the shards in place.
    toy = ROOT / "recipes" / "toy-dpo.toml"
    args = [f'model.base="{tiny_dir}"', "stages.0.steps=1", "stages.1.steps=2"]
    train(load_recipe(toy, [*args, f'run.out="{tmp_path / "one"}"']), progress=False)
    torchrun(toy, tmp_path / "two", *[a for o in [*args, "run.distributed=fsdp"] for a in ("--set", o)])
    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_fsdp_refuses_contrastive_stages(tiny_dir, tmp_path):
    from tinyomni.train.trainer import Dist, Trainer

    recipe = load_recipe(ROOT / "recipes" / "toy.toml", [f'model.base="{tiny_dir}"', "run.distributed=fsdp"])
    trainer = Trainer(recipe, Dist(rank=0, world=1))
    trainer.fsdp = True  # as under torchrun; the check comes before anything distributed
    with pytest.raises(ConfigError, match="runs sft and dpo stages"):
        trainer._run_stage(0, recipe.stages[0], 0, None, None, None)
