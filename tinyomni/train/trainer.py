"""The training loop: stages in order, each with its trainable parts, optimiser, schedule and data.

    from tinyomni.train import load_recipe, train
    train(load_recipe("recipes/toy.toml"))            # or: tinyomni train recipes/toy.toml

One optimizer step of a stage:
  1. the step's micro-batches come from `StageBatches` (a pure function of the step: resumable);
  2. chat stages: the loss is the summed cross-entropy of the assistant tokens divided by the number
     of such tokens in the whole global batch (all micro-batches, all processes), so gradient
     accumulation and DDP give the gradient of one big batch, whatever the padding or split;
     contrastive stages: the CLIP/SigLIP loss of the batch with negatives from every process;
  3. gradients are clipped, AdamW steps with per-module learning rates on a warm-up + cosine schedule.
Checkpoints every `save_every` steps and at every stage end (atomic), a JSONL log, a PNG of the
curves, periodic evaluation through the eval harness, and DDP when launched by torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni import api
from tinyomni.config import AudioConfig, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import ConfigError
from tinyomni.model.lora import apply_lora, is_lora_key, merge_lora
from tinyomni.train import checkpoint as ckpt
from tinyomni.train.contrastive import ContrastiveModule
from tinyomni.train.data import (
    IGNORE,
    ChatBatch,
    RecordSource,
    StageBatches,
    chat_example,
    pair_example,
    tag_vocabulary,
)
from tinyomni.train.plot import plot_curves
from tinyomni.train.recipe import EvalSpec, Recipe, StageSpec

LOG_FILE, PLOT_FILE, MODEL_DIR = "log.jsonl", "curves.png", "model"


# --- the model -------------------------------------------------------------------------------------

def build_model(recipe: Recipe) -> api.Model:
    """The starting model of a recipe, built the same way every time (seeded), so a resumed run can
    rebuild it and load only what training changed."""
    spec = recipe.model
    if spec.base == "tiny":
        return api.tiny_random_model(seed=spec.seed)
    path = Path(spec.base).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and api._model_type(path) == "tinyomni":
        if spec.vision or spec.audio or spec.config:
            raise ConfigError("model.vision / audio / config apply to new encoders, not to a tinyomni checkpoint")
        return api.load(path)
    fields = dict(spec.config)
    for name in ("vision_projector", "audio_projector"):
        if name in fields:
            fields[name] = ProjectorConfig(**fields[name])
    model = api.from_base_decoder(spec.base, vision=VisionConfig(**spec.vision), audio=AudioConfig(**spec.audio),
                                  seed=spec.seed, **fields)
    OmniConfig.validate(model.config)
    return model


class ChatLoss(nn.Module):
    """The omni model's forward, with logits only where there are labels (the LM head over the whole
    sequence would be a large share of the compute for one-word answers). Returns the summed loss."""

    def __init__(self, omni: nn.Module) -> None:
        super().__init__()
        self.omni = omni

    def forward(self, batch: ChatBatch) -> Tensor:
        omni = self.omni
        embeds = omni.embed(batch.input_ids, batch.pixel_values, batch.audio_features or None)
        # Right padding under a causal mask: real tokens never see the pads, so no mask is needed.
        hidden = omni.language_model.hidden_states(embeds)
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE
        logits = omni.language_model.lm_head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def train_mode(module: nn.Module) -> None:
    """`module.train()`, except BatchNorm layers whose weights are frozen: their running statistics are
    part of what was trained before, so a stage that does not train them must not move them either."""
    module.train()
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in sub.parameters()):
            sub.eval()


def set_trainable(omni: nn.Module, stage: StageSpec) -> list[str]:
    """Freeze everything, then unfreeze the stage's modules and LoRA adapters; returns the names."""
    for p in omni.parameters():
        p.requires_grad_(False)
    names = []
    for name, p in omni.named_parameters():
        prefix_match = any(name.startswith(prefix) for prefix in stage.train)
        if prefix_match or (stage.lora is not None and is_lora_key(name)):
            p.requires_grad_(True)
            names.append(name)
    if stage.kind == "sft" and not names:
        raise ConfigError(f"stage {stage.name!r}: train = {stage.train} matches no parameter")
    return names


def store_frozen_in_bf16(omni: nn.Module, recipe: Recipe) -> None:
    """Keep the parameters that no stage trains (the base decoder, typically) in bfloat16. Autocast
    would cast them on every forward anyway; stored in bf16 they cost half the memory and no casts.
    LoRA adapters and everything trained keep float32 weights."""
    prefixes = [p for s in recipe.stages for p in s.train]
    prefixes += [f"{s.tower}_tower." for s in recipe.stages if s.kind == "contrastive"]
    for name, p in omni.named_parameters():
        if not any(name.startswith(prefix) for prefix in prefixes):
            p.data = p.data.to(torch.bfloat16)


def param_groups(named: list[tuple[str, nn.Parameter]], stage: StageSpec) -> list[dict[str, Any]]:
    """AdamW groups by (learning rate, decay): the lr of the longest matching `module_lr` prefix
    ("lora" matches adapters), no weight decay on norms, biases and other 1-d tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named:
        matches = [k for k in stage.module_lr if name.startswith(k) or (k == "lora" and is_lora_key(name))]
        lr = stage.module_lr[max(matches, key=len)] if matches else stage.lr
        decay = stage.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_factor(step: int, stage: StageSpec) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at the last step."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --- distributed -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str | None = None) -> Dist:
    """DDP when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


# --- the run ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    out: Path
    global_step: int
    losses: list[float]  # the logged losses of this invocation
    model_dir: Path | None


def train(recipe: Recipe, resume: bool = False, stop_after: int | None = None, progress: bool = True,
          device: str | None = None) -> RunResult:
    """Run (or continue, with `resume`) a recipe. `stop_after` stops after that many global steps
    (with a checkpoint), as an interruption would."""
    trainer = Trainer(recipe, init_distributed(device), progress)
    try:
        return trainer.run(resume, stop_after)
    finally:
        if trainer.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, recipe: Recipe, env: Dist, progress: bool = True) -> None:
        self.recipe, self.dist, self.progress = recipe, env, progress and env.main
        self.out = Path(recipe.run.out)
        if recipe.run.threads:
            torch.set_num_threads(recipe.run.threads)
        self.model = build_model(recipe)
        self.omni = self.model.model.to(env.device)
        if recipe.run.autocast == "bfloat16":
            store_frozen_in_bf16(self.omni, recipe)
        self.trained: set[str] = set()
        self.losses: list[float] = []
        self.global_step = 0
        self._eval_items: list[Any] | None = None

    # --- state -------------------------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        if self.dist.main:
            with (self.out / LOG_FILE).open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _saved_weights(self, extra: nn.Module | None) -> dict[str, Tensor]:
        state = self.omni.state_dict()
        # Buffers that training moves (BatchNorm statistics) travel with their module's trained weights.
        owners = {k.rsplit(".", 1)[0] for k in self.trained}
        moved = {k for k, _ in self.omni.named_buffers() if k.rsplit(".", 1)[0] in owners}
        weights = {k: v for k, v in state.items() if k in self.trained or k in moved or is_lora_key(k)}
        if extra is not None:
            weights.update({f"stage_module.{k}": v for k, v in extra.state_dict().items()
                            if not k.startswith("encoder.")})
        return weights

    def _checkpoint(self, stage_index: int, step: int, optimizer: torch.optim.Optimizer,
                    extra: nn.Module | None) -> None:
        if self.dist.main:
            state = ckpt.TrainState(stage_index, step, self.global_step, sorted(self.trained))
            ckpt.save_checkpoint(self.out, state, self._saved_weights(extra), optimizer.state_dict(),
                                 self.recipe.to_dict(), self.recipe.run.keep_checkpoints)
            plot_curves(read_log(self.out), self.out / PLOT_FILE, self.recipe.name)
        self.dist.barrier()

    def _restore(self) -> tuple[ckpt.TrainState, dict[str, Tensor], dict[str, Any]] | None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            return None
        state, weights, optimizer = ckpt.load_checkpoint(path)
        # The adapters of every stage up to the checkpoint's, so its LoRA weights have a home.
        for i, stage in enumerate(self.recipe.stages[: state.stage + 1]):
            if stage.lora is not None:
                self._apply_lora(i, stage)
        own = {k: v for k, v in weights.items() if not k.startswith("stage_module.")}
        missing = set(own) - set(self.omni.state_dict())
        if missing:
            raise ConfigError(f"{path} does not fit this recipe's model: {sorted(missing)[:3]}")
        self.omni.load_state_dict(own, strict=False)
        self.trained = set(state.trained)
        self.global_step = state.global_step
        # The log continues from the checkpoint: drop what a killed run wrote after it.
        if self.dist.main:
            rows = [r for r in read_log(self.out) if r.get("global_step", 0) <= state.global_step]
            tmp = self.out / (LOG_FILE + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.out / LOG_FILE)
        return state, weights, optimizer

    def _apply_lora(self, index: int, stage: StageSpec) -> None:
        # Seeded, so the adapters a stage starts with are the same in a fresh and a resumed run.
        with api._seeded(self.recipe.run.seed * 1000 + index):
            apply_lora(self.omni, stage.lora)

    # --- run ---------------------------------------------------------------------------------------
    def run(self, resume: bool, stop_after: int | None) -> RunResult:
        run = self.recipe.run
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale(self.out)
        self.dist.barrier()
        torch.manual_seed(run.seed)  # before a restore, which brings back the saved random states
        restored = None
        if resume:
            restored = self._restore()
        elif ckpt.latest_checkpoint(self.out) is not None:
            raise ConfigError(f"{self.out} already holds checkpoints: pass --resume to continue, "
                              "or choose another run.out")
        elif self.dist.main:
            (self.out / LOG_FILE).unlink(missing_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=1) + "\n")
        for index, stage in enumerate(self.recipe.stages):
            start, optimizer_state, stage_weights = 0, None, None
            if restored is not None:
                state, weights, opt = restored
                if index < state.stage or (index == state.stage and state.step >= stage.steps):
                    continue  # finished before the checkpoint
                if index == state.stage:
                    start, optimizer_state = state.step, opt
                    stage_weights = {k[len("stage_module."):]: v for k, v in weights.items()
                                     if k.startswith("stage_module.")}
                restored = None
            if not self._run_stage(index, stage, start, optimizer_state, stage_weights, stop_after):
                return RunResult(self.out, self.global_step, self.losses, None)
        model_dir = self.export() if self.dist.main else None
        self.dist.barrier()
        return RunResult(self.out, self.global_step, self.losses, model_dir)

    def _run_stage(self, index: int, stage: StageSpec, start: int, optimizer_state: dict | None,
                   stage_weights: dict[str, Tensor] | None, stop_after: int | None) -> bool:
        """Train one stage from step `start`; False when stopped early by `stop_after`."""
        run, env, omni = self.recipe.run, self.dist, self.omni
        if stage.lora is not None:
            self._apply_lora(index, stage)
        names = set_trainable(omni, stage)
        module = self._stage_module(index, stage)
        if stage_weights:
            module.load_state_dict(stage_weights, strict=False)
        self.trained |= {n for n in names if not is_lora_key(n)}
        named = [(_omni_name(n, stage), p) for n, p in module.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(named, stage), betas=stage.betas,
                                      fused=env.device.type == "cuda")
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        wrapped: nn.Module = module
        if env.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # A chat batch without images (or audio) leaves that tower unused in its backward.
            towers = ("vision_tower", "multi_modal_projector", "audio_tower", "audio_projector")
            unused = stage.kind == "sft" and any(n.startswith(towers) for n, _ in named)
            wrapped = DistributedDataParallel(module, find_unused_parameters=unused)
        micro = stage.micro_batch_size
        if stage.kind == "contrastive" and micro is not None and micro < stage.batch_size // env.world:
            raise ConfigError(f"stage {stage.name!r}: a contrastive loss needs the whole batch at once "
                              "(no micro_batch_size)")
        source = RecordSource(stage.data)
        make = (pair_example(self.model.tokenizer, self.model.config, stage) if stage.kind == "contrastive"
                else chat_example(self.model.processor, stage))
        batches = StageBatches(stage, make, source, self.model.tokenizer.pad_token_id, run.seed,
                               env.rank, env.world, start, micro)
        loader: Iterator = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=run.workers,
                                                            prefetch_factor=2 if run.workers else None))
        autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=run.autocast == "bfloat16")
        train_mode(omni)
        trainable = [p for _, p in named]
        window = {"loss": 0.0, "samples": 0, "steps": 0, "dropped": 0, "t": time.perf_counter()}
        with _progress_bar(self.progress, stage, start) as bar:
            for step in range(start, stage.steps):
                micro_batches, dropped = next(loader)
                factor = lr_factor(step, stage)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                loss, samples = self._step(stage, wrapped, micro_batches, autocast)
                norm = torch.nn.utils.clip_grad_norm_(trainable, stage.clip_grad or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                window["loss"] += loss
                window["samples"] += samples
                window["steps"] += 1
                window["dropped"] += int(env.sum(dropped))
                bar.update(step + 1, loss, samples)
                done = step + 1 == stage.steps
                if (step + 1) % run.log_every == 0 or done:
                    elapsed = time.perf_counter() - window["t"]
                    row = {"type": "train", "stage": stage.name, "step": step + 1, "global_step": self.global_step,
                           "loss": window["loss"] / window["steps"], "lr": stage.lr * factor,
                           "grad_norm": float(norm), "samples_per_s": window["samples"] / elapsed,
                           "dropped": window["dropped"], "time": time.time()}
                    self.losses.append(row["loss"])
                    self._log(row)
                    window = {"loss": 0.0, "samples": 0, "steps": 0, "dropped": 0, "t": time.perf_counter()}
                evaluate_now = self.recipe.eval.every and self.global_step % self.recipe.eval.every == 0
                if evaluate_now or (done and index == len(self.recipe.stages) - 1 and self.recipe.eval.at_end):
                    self.evaluate(stage.name)
                stop = stop_after is not None and self.global_step >= stop_after
                if done or stop or self.global_step % run.save_every == 0:
                    extra = module if isinstance(module, ContrastiveModule) else None
                    self._checkpoint(index, step + 1, optimizer, extra)
                if stop and not done:
                    return False
        return not (stop_after is not None and self.global_step >= stop_after
                    and index < len(self.recipe.stages) - 1)

    def _stage_module(self, index: int, stage: StageSpec) -> nn.Module:
        """What the stage's forward is: the chat loss over the omni model, or a contrastive module
        around one of its encoders (its text tower seeded, so a resumed stage rebuilds it equally)."""
        if stage.kind == "sft":
            return ChatLoss(self.omni)
        config = self.model.config
        if stage.tower == "vision":
            encoder, width = self.omni.vision_tower, config.vision.hidden_size
        else:
            encoder, width = self.omni.audio_tower, config.audio.d_model
        if encoder is None:
            raise ConfigError(f"stage {stage.name!r}: the model has no {stage.tower} encoder")
        encoder.requires_grad_(True)
        prefix = "vision_tower." if stage.tower == "vision" else "audio_tower."
        self.trained |= {n for n, p in self.omni.named_parameters() if n.startswith(prefix) and p.requires_grad}
        tags = tag_vocabulary(RecordSource(stage.data), self.model.tokenizer, stage) if stage.tag_loss else None
        with api._seeded(self.recipe.run.seed * 1000 + index):
            module = ContrastiveModule(encoder, width, stage.tower, len(self.model.tokenizer), stage.text_tower,
                                       stage.loss, config.audio, stage.tag_loss, tags)
        # Whisper's sinusoid position table stays fixed, as in the model.
        for name, p in encoder.named_parameters():
            if name.startswith("embed_positions"):
                p.requires_grad_(False)
        return module.to(self.dist.device)

    def _step(self, stage: StageSpec, module: nn.Module, micro_batches: list[Any],
              autocast: contextlib.AbstractContextManager) -> tuple[float, int]:
        """Forward and backward over the step's micro-batches; returns (global loss, global samples)."""
        env = self.dist
        samples = env.sum(sum(b.samples for b in micro_batches))
        if stage.kind == "contrastive":
            with autocast:
                loss = module(_to(micro_batches[0], env.device))
            loss.backward()
            return float(loss.detach()), int(samples)
        tokens = env.sum(sum(b.target_tokens for b in micro_batches))
        total = 0.0
        for k, batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            # DDP all-reduces the gradients once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or env.world == 1 else module.no_sync()
            with sync:
                with autocast:
                    loss_sum = module(_to(batch, env.device))
                # DDP averages over processes; scaling by `world` makes that the global-batch mean.
                (loss_sum * env.world / max(tokens, 1.0)).backward()
            total += float(loss_sum.detach())
        return env.sum(total) / max(tokens, 1.0), int(samples)

    # --- evaluation and export ---------------------------------------------------------------------
    def evaluate(self, stage_name: str) -> None:
        """The eval harness on a small slice of the world (main process only); scores go to the log."""
        if self.dist.main:
            from tinyomni.eval.runner import RunConfig, evaluate

            spec = self.recipe.eval
            if self._eval_items is None:
                self._eval_items = eval_items(spec)
            model = api.Model(self.omni, self.model.tokenizer, self.model.chat_template, name=self.recipe.name)
            out = self.out / "eval" / f"step-{self.global_step:07d}"
            config = RunConfig(batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, progress=False,
                               resume=False)
            autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16,
                                      enabled=self.recipe.run.autocast == "bfloat16")
            with torch.no_grad(), autocast:
                summary = evaluate(model, self._eval_items, out, model_name=self.recipe.name, config=config)
            train_mode(self.omni)
            self._log({"type": "eval", "stage": stage_name, "global_step": self.global_step,
                       "average": summary["average"],
                       "tasks": {k: v["score"] for k, v in summary["tasks"].items()}})
        self.dist.barrier()

    def export(self) -> Path:
        """The trained model as a checkpoint directory `<out>/model`, loadable by `tinyomni.load`.
        LoRA adapters are kept apart (small, the base decoder stays a reference) or merged."""
        lora_mode = self.recipe.run.lora_export
        if lora_mode == "merged":
            merge_lora(self.omni)
        config = self.model.config
        decoder_trained = any(n.startswith("language_model.") for n in self.trained)
        store = config.base_decoder is None or decoder_trained or (lora_mode == "merged" and self._had_lora())
        self.omni.eval()
        return self.model.save(self.out / MODEL_DIR, store_decoder=store)

    def _had_lora(self) -> bool:
        return any(s.lora is not None for s in self.recipe.stages)


def eval_items(spec: EvalSpec) -> list[Any]:
    from tinyomni.eval.tasks import item_from_record
    from tinyomni.world.generator import generate, to_record
    from tinyomni.world.sample import Difficulty

    difficulty = Difficulty().with_overrides(spec.difficulty)
    return [item_from_record(to_record(s), where=s.id, default_id=s.id, default_task=s.skill)
            for s in generate(spec.skills, n=spec.n, split=spec.split, seed=spec.seed, difficulty=difficulty)]


def read_log(out: Path) -> list[dict[str, Any]]:
    path = out / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _omni_name(name: str, stage: StageSpec) -> str:
    """A stage module's parameter name as the omni model calls it, so `module_lr` keys are the
    model's own names (`vision_tower`, `multi_modal_projector`, ...)."""
    if name.startswith("omni."):
        return name[len("omni."):]
    if name.startswith("encoder."):
        return ("vision_tower." if stage.tower == "vision" else "audio_tower.") + name[len("encoder."):]
    return name


def _to(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    moved = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], Tensor):
            v = [t.to(device, non_blocking=True) for t in v]
        moved[f.name] = v
    return type(batch)(**moved)


class _Bar:
    """A rich progress bar with loss, samples/s and ETA (or nothing, when disabled)."""

    def __init__(self, enabled: bool, stage: StageSpec, start: int) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"),
                                 TextColumn("{task.fields[speed]:.1f} samples/s"), TextColumn("ETA"),
                                 TimeRemainingColumn())
        self.task = self.progress.add_task(stage.name, total=stage.steps, completed=start, loss=float("nan"),
                                           speed=0.0)
        self.t = time.perf_counter()

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, completed: int, loss: float, samples: int) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        speed = samples / max(now - self.t, 1e-9)
        self.t = now
        self.progress.update(self.task, completed=completed, loss=loss, speed=speed)


def _progress_bar(enabled: bool, stage: StageSpec, start: int) -> _Bar:
    return _Bar(enabled, stage, start)
