"""The training loop: stages in order, each with its trainable parts, optimiser, schedule and data.

    from tinyomni.train import load_recipe, train
    train(load_recipe("recipes/toy.toml"))            # or: tinyomni train recipes/toy.toml

One optimizer step of a stage:
  1. the step's micro-batches come from `StageBatches` (a pure function of the step: resumable);
  2. chat stages: the loss is the summed cross-entropy of the assistant tokens divided by the number
     of such tokens in the whole global batch (all micro-batches, all processes), so gradient
     accumulation and DDP give the gradient of one big batch, whatever the padding or split;
     contrastive stages: the CLIP/SigLIP loss of the batch with negatives from every process;
     dpo stages: the reference's and the policy's summed answer log-probs, each loss term summed and
     divided by its global count (pairs, or chosen tokens for the SFT term of MPO's mixture);
     distill stages: T²·KL to a frozen local teacher (and the label loss, weighted by alpha) summed over
     the answer tokens and divided by their global count; distill_vision: the feature loss per image,
     summed and divided by the global images (train/distill_stage.py);
  3. gradients are clipped, AdamW steps with per-module learning rates on a warm-up + cosine schedule.
Checkpoints every `save_every` steps and at every stage end (atomic), a JSONL log, a PNG of the
curves, periodic evaluation through the eval harness, and DDP (or FSDP with `run.distributed =
"fsdp"`: fully_shard per decoder layer, sharded checkpoints) when launched by torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from tinyomni.model.moe import routing_aux_loss, take_routing_load
from tinyomni.train import checkpoint as ckpt
from tinyomni.train.contrastive import ContrastiveModule
from tinyomni.train.data import (
    IGNORE,
    ChatBatch,
    PreferenceBatch,
    RecordSource,
    StageBatches,
    chat_example,
    pair_example,
    preference_example,
    tag_vocabulary,
)
from tinyomni.train.distill_stage import (
    DistillBatch,
    DistillBatches,
    VisionDistillModule,
    check_same_tokenizer,
    distill_example,
    distillation_loss,
    image_pair_example,
    load_teacher,
)
from tinyomni.train.plot import plot_curves
from tinyomni.train.recipe import CHAT_KINDS, DISTILL_KINDS, EvalSpec, PreferenceSpec, Recipe, StageSpec

LOG_FILE, PLOT_FILE, MODEL_DIR = "log.jsonl", "curves.png", "model"


# --- the model -------------------------------------------------------------------------------------

def build_model(recipe: Recipe) -> api.Model:
    """The starting model of a recipe, built the same way every time (seeded), so a resumed run can
    rebuild it and load only what training changed."""
    model = _starting_model(recipe)
    if recipe.model.visual_expert:
        from tinyomni.model.visual_expert import add_visual_expert

        add_visual_expert(model.model)
    return model


def _starting_model(recipe: Recipe) -> api.Model:
    spec = recipe.model
    if spec.from_ is not None:
        if spec.vision or spec.audio or spec.config:
            raise ConfigError("model.vision / audio / config apply to new encoders, not to a model given by model.from")
        model = api.load(spec.from_)
        # What the final checkpoint refers to: a local base by its absolute path, so the run's model
        # loads from anywhere; a name or hub id as it is.
        local = Path(spec.from_).expanduser()
        model.config.base_model = str(local.resolve()) if local.exists() else spec.from_
        return model
    if spec.base == "tiny":
        if spec.vision_from is not None:
            raise ConfigError("model.vision_from needs a base decoder to build a new model on, not base = \"tiny\"")
        return api.tiny_random_model(seed=spec.seed)
    path = Path(spec.base).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and api._model_type(path) == "tinyomni":
        if spec.vision or spec.audio or spec.config or spec.vision_from:
            raise ConfigError("model.vision / audio / config / vision_from apply to new encoders, not to a "
                              "tinyomni checkpoint")
        return api.load(path)
    fields = dict(spec.config)
    for name in ("vision_projector", "audio_projector"):
        if name in fields:
            fields[name] = ProjectorConfig(**fields[name])
    vision, source = dict(spec.vision), None
    if spec.vision_from is not None:
        source = api.load(spec.vision_from)
        if source.model.vision_tower is None:
            raise ConfigError(f"model.vision_from: {spec.vision_from} has no vision tower")
        vision = {**dataclasses.asdict(source.config.vision), **vision}  # the tower's config, then the recipe's
    model = api.from_base_decoder(spec.base, vision=VisionConfig(**vision), audio=AudioConfig(**spec.audio),
                                  seed=spec.seed, **fields)
    OmniConfig.validate(model.config)
    if source is not None:
        _copy_vision_tower(source.model.vision_tower, model.model.vision_tower, spec.vision_from)
    return model


def _copy_vision_tower(source: nn.Module, target: nn.Module, where: str) -> None:
    """The source tower's weights and buffers (BatchNorm statistics too) into the new model's, which must
    have the same tensors and shapes; a ConfigError names those that differ."""
    theirs, own = source.state_dict(), target.state_dict()
    differ = sorted(set(theirs) ^ set(own))
    differ += [f"{k} {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(theirs) & set(own))
               if theirs[k].shape != own[k].shape]
    if differ:
        raise ConfigError(f"model.vision_from: the vision tower of {where} does not fit the recipe's (model.vision "
                          f"changes its shapes): {', '.join(differ[:6])}" + (" ..." if len(differ) > 6 else ""))
    target.load_state_dict(theirs)


class ChatForward(nn.Module):
    """The omni model's forward on a chat batch, with logits only where there are labels (the LM head
    over the whole sequence would be a large share of the compute for one-word answers).

    Returns the summed cross-entropy of the labelled tokens (sft), with `per_row` each row's summed
    log-probability of its labelled tokens (what DPO compares), or with `logits` the logits [N, V] that
    predict the N labelled tokens, in order (what distillation compares). One instance serves every chat
    stage, so under FSDP it is sharded once, as the root around the per-layer units."""

    def __init__(self, omni: nn.Module) -> None:
        super().__init__()
        self.omni = omni
        # Under FSDP every process must produce a gradient for every trained parameter, or the
        # reduce-scatters disagree; a batch without images (audio) touches these with a zero term.
        # Names, not tensors: inside the forward FSDP has put the gathered parameters in their place.
        self.touch: dict[str, list[str]] = {}

    def forward(self, batch: ChatBatch, per_row: bool = False, logits: bool = False) -> Tensor:
        omni = self.omni
        # The media and what travels beside them (Q-Former ids, LLaVA-NeXT layouts), as generation passes them.
        embeds = omni.embed(batch.input_ids, **batch.media_inputs())
        # Right padding under a causal mask: real tokens never see the pads, so no mask is needed.
        hidden = omni.language_model.hidden_states(embeds, **omni.decoder_inputs(batch.input_ids))
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE
        scores = omni.language_model.lm_head(hidden[:, :-1][keep]).float()
        zero = self._untouched(batch)
        if logits:
            return scores + zero
        if not per_row:
            return F.cross_entropy(scores, targets[keep], reduction="sum") + zero + self._router_loss(keep)
        token_logps = -F.cross_entropy(scores, targets[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=token_logps.device)
        return sums.index_add(0, rows, token_logps) + zero

    def _router_loss(self, keep: Tensor) -> Tensor | float:
        """An MoE decoder's load-balancing loss (router_aux_loss_coef > 0), times the labelled tokens: the
        stage divides the summed loss by them, so it enters the step's loss as coef * aux."""
        aux = routing_aux_loss(self.omni.language_model)
        return 0.0 if aux is None else aux * keep.sum()

    def _untouched(self, batch: ChatBatch) -> Tensor | float:
        absent = {"vision": batch.pixel_values is None, "audio": not batch.audio_features}
        unused = [n for kind, names in self.touch.items() if absent[kind] for n in names]
        if not unused or not torch.is_grad_enabled():
            return 0.0
        return sum(self.omni.get_parameter(n).sum() for n in unused) * 0.0


def preference_losses(policy: Tensor, reference: Tensor, spec: PreferenceSpec) -> dict[str, Tensor]:
    """The terms of a dpo stage for B pairs, from the summed answer log-probs of the policy and of the
    reference, each [2B]: the chosen rows, then the rejected ones. Returns per pair `dpo` and `quality`
    losses and `margin` (β·Δ, the implicit reward margin), and `nll`, the chosen answers' summed
    cross-entropy. The formulas are TRL's (loss_type "sigmoid", "robust", "bco_pair", "sft")."""
    chosen, rejected = policy.float().chunk(2)
    ref_chosen, ref_rejected = reference.float().chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    logits = spec.beta * (chosen_ratio - rejected_ratio)
    e = spec.label_smoothing
    if spec.loss == "sigmoid":  # DPO; with e > 0, conservative DPO
        dpo = -(1 - e) * F.logsigmoid(logits) - e * F.logsigmoid(-logits)
    else:  # robust DPO: unbiased under labels flipped with probability e
        dpo = (-(1 - e) * F.logsigmoid(logits) + e * F.logsigmoid(-logits)) / (1 - 2 * e)
    quality = -F.logsigmoid(spec.beta * chosen_ratio) - F.logsigmoid(-spec.beta * rejected_ratio)
    return {"dpo": dpo, "quality": quality, "margin": logits.detach(), "nll": -chosen.sum()}


class Reference:
    """The frozen starting point of a dpo stage, without a second model in memory. LoRA adapters the
    stage itself created start at exactly zero, so the reference forward switches them off (TRL does
    the same with peft); whatever else the stage trains (adapters of an earlier stage, modules in
    `train`) is copied at the stage's start, and the copy is swapped in for the reference forward.
    The reference runs in eval mode: no dropout, BatchNorm statistics untouched."""

    def __init__(self, omni: nn.Module, fresh_lora: list[str], copies: dict[str, Tensor]) -> None:
        self.omni, self.fresh, self.copies = omni, fresh_lora, copies

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        omni = self.omni
        params = dict(omni.named_parameters())
        layers = [omni.get_submodule(name) for name in self.fresh]
        with torch.no_grad():
            current = {name: params[name].detach().clone() for name in self.copies}
            for name, value in self.copies.items():
                params[name].copy_(value)  # in place: under FSDP the shard is what gets all-gathered
        for layer in layers:
            layer.forward = functools.partial(_base_linear, layer)
        omni.eval()
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)
            train_mode(omni)


def _base_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def train_mode(module: nn.Module) -> None:
    """`module.train()`, except BatchNorm layers whose weights are frozen: their running statistics are
    part of what was trained before, so a stage that does not train them must not move them either."""
    module.train()
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in sub.parameters()):
            sub.eval()


def set_trainable(omni: nn.Module, stage: StageSpec, adapters: set[str] | None = None) -> list[str]:
    """Freeze everything, then unfreeze the stage's modules and LoRA adapters (those of the layers in
    `adapters`, when given: under FSDP every stage's adapters exist from the start, and a stage trains
    only those it or an earlier stage made); returns the names."""
    for p in omni.parameters():
        p.requires_grad_(False)
    names = []
    for name, p in omni.named_parameters():
        prefix_match = any(name.startswith(prefix) for prefix in stage.train)
        lora = stage.lora is not None and is_lora_key(name) and (
            adapters is None or name.rsplit(".", 2)[0] in adapters)
        if prefix_match or lora:
            p.requires_grad_(True)
            names.append(name)
    if stage.kind in CHAT_KINDS and not names:
        raise ConfigError(f"stage {stage.name!r}: train = {stage.train} matches no parameter")
    return names


def store_frozen_in_bf16(omni: nn.Module, recipe: Recipe) -> None:
    """Keep the parameters that no stage trains (the base decoder, typically) in bfloat16. Autocast
    would cast them on every forward anyway; stored in bf16 they cost half the memory and no casts.
    LoRA adapters and everything trained keep float32 weights."""
    prefixes = [p for s in recipe.stages for p in s.train]
    prefixes += [f"{s.tower}_tower." for s in recipe.stages if s.kind in ("contrastive", "distill_vision")]
    # BatchNorm (a conv stem's) keeps float32 weights: in eval mode under autocast, batch_norm wants its
    # weights in the dtype of its float32 running statistics (bf16 ones fail: "expected BFloat16 but Float").
    batch_norms = {f"{m}.{k}" for m, mod in omni.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
                   for k, _ in mod.named_parameters(recurse=False)}
    for name, p in omni.named_parameters():
        if not any(name.startswith(prefix) for prefix in prefixes) and name not in batch_norms:
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
        self.fsdp = recipe.run.distributed == "fsdp" and env.world > 1
        self.model = build_model(recipe)
        self.omni = self.model.model.to(env.device)
        # FSDP all-gathers each unit's parameters as one flat buffer of one dtype, so under FSDP the
        # frozen weights stay float32 too (autocast still computes in bf16).
        if recipe.run.autocast == "bfloat16" and not self.fsdp:
            store_frozen_in_bf16(self.omni, recipe)
        self.trained: set[str] = set()
        self.losses: list[float] = []
        self.global_step = 0
        self._eval_items: list[Any] | None = None
        self.lora_owner: dict[str, int] = {}  # LoRA layer -> the stage that made it
        self.chat = ChatForward(self.omni)  # the forward of every chat stage (one module: FSDP shards it once)
        self.reference: Reference | None = None  # the frozen starting point of the running dpo stage
        self._teacher: tuple[str, api.Model] | None = None  # a distill stage's teacher, loaded once
        self._teacher_forward: ChatForward | None = None  # its chat forward (logits on the answer tokens)
        if self.fsdp:
            self._shard()

    def _shard(self) -> None:
        """FSDP: every stage's adapters first (seeded as ever, so their starting values are those of a
        run without FSDP), then one unit per decoder layer and the chat forward as the root."""
        from torch.distributed.fsdp import fully_shard

        for index, stage in enumerate(self.recipe.stages):
            if stage.lora is not None:
                self._apply_lora(index, stage)
        for layer in self.omni.language_model.model.layers:
            fully_shard(layer)
        fully_shard(self.chat)

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
        if self.reference is not None:  # a resumed dpo stage needs its starting point again
            weights.update({f"reference.{k}": v for k, v in self.reference.copies.items()})
        return weights

    def _checkpoint(self, stage_index: int, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: nn.Module | None) -> None:
        state = ckpt.TrainState(stage_index, step, self.global_step, sorted(self.trained))
        run = self.recipe.run
        if self.fsdp:  # every process writes its shards (torch.distributed.checkpoint)
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            ckpt.save_sharded_checkpoint(self.out, state, self._saved_weights(extra),
                                         get_optimizer_state_dict(module, optimizer), self.recipe.to_dict(),
                                         run.keep_checkpoints, self.dist.main)
        elif self.dist.main:
            ckpt.save_checkpoint(self.out, state, self._saved_weights(extra), optimizer.state_dict(),
                                 self.recipe.to_dict(), run.keep_checkpoints)
        if self.dist.main:
            plot_curves(read_log(self.out), self.out / PLOT_FILE, self.recipe.name)
        self.dist.barrier()

    def _restore(self) -> tuple[ckpt.TrainState, dict[str, Tensor], Any] | None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            return None
        # The adapters of every stage up to the checkpoint's, so its LoRA weights have a home.
        state = ckpt.read_state(path)
        for i, stage in enumerate(self.recipe.stages[: state.stage + 1]):
            if stage.lora is not None:
                self._apply_lora(i, stage)
        own_state = self.omni.state_dict()
        if self.fsdp and ckpt.is_sharded(path):
            state, weights, optimizer = ckpt.load_sharded_checkpoint(path, own_state)
        else:  # a sharded checkpoint is consolidated in memory; under FSDP a full one is sharded
            state, weights, optimizer = ckpt.load_checkpoint(path)
            if self.fsdp:
                weights = _distribute_like(weights, own_state)
        own = {k: v for k, v in weights.items() if not k.startswith(("stage_module.", "reference."))}
        missing = set(own) - set(own_state)
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
            made = apply_lora(self.omni, stage.lora)
        for name in made:
            self.lora_owner.setdefault(name, index)

    def _load_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> None:
        """Optimizer state from a checkpoint of either kind: torch's own (parameters by position),
        by parameter name (a consolidated FSDP checkpoint), or FSDP shards."""
        names = {id(p): n for n, p in module.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        if not self.fsdp:
            optimizer.load_state_dict(ckpt.optimizer_by_position(saved, order))
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        if isinstance(saved, ckpt.ShardedOptimizer):
            state = get_optimizer_state_dict(module, optimizer)  # the layout to read the shards into
            saved.load_into(state)
            set_optimizer_state_dict(module, optimizer, state)
        else:
            set_optimizer_state_dict(module, optimizer, ckpt.optimizer_by_name(saved, order),
                                     options=StateDictOptions(full_state_dict=True))

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
                    stage_weights = {k: v for k, v in weights.items()
                                     if k.startswith(("stage_module.", "reference."))}
                restored = None
            if not self._run_stage(index, stage, start, optimizer_state, stage_weights, stop_after):
                return RunResult(self.out, self.global_step, self.losses, None)
        plain = self._plain_model()
        model_dir = self.export(plain) if self.dist.main else None
        self.dist.barrier()
        return RunResult(self.out, self.global_step, self.losses, model_dir)

    def _run_stage(self, index: int, stage: StageSpec, start: int, optimizer_state: Any,
                   stage_weights: dict[str, Tensor] | None, stop_after: int | None) -> bool:
        """Train one stage from step `start`; False when stopped early by `stop_after`."""
        run, env, omni = self.recipe.run, self.dist, self.omni
        stage_weights = stage_weights or {}
        if self.fsdp and stage.kind not in ("sft", "dpo"):
            raise ConfigError(f'stage {stage.name!r}: run.distributed = "fsdp" runs sft and dpo stages; run '
                              f'{stage.kind} stages with "ddp", then resume their checkpoint with "fsdp"')
        if stage.lora is not None:
            self._apply_lora(index, stage)
        teacher = self._teacher_model(stage) if stage.kind in DISTILL_KINDS else None
        if stage.kind == "distill":
            check_same_tokenizer(self.model, teacher)
        adapters = {n for n, owner in self.lora_owner.items() if owner <= index} if self.fsdp else None
        names = set_trainable(omni, stage, adapters)
        module = self._stage_module(index, stage)
        extra = {k[len("stage_module."):]: v for k, v in stage_weights.items() if k.startswith("stage_module.")}
        if extra:
            module.load_state_dict(extra, strict=False)
        self.trained |= {n for n in names if not is_lora_key(n)}
        self.reference = self._reference(index, stage, start, stage_weights) if stage.kind == "dpo" else None
        if self.fsdp:
            parts = {"vision": ("vision_tower.", "multi_modal_projector."),
                     "audio": ("audio_tower.", "audio_projector.")}
            self.chat.touch = {kind: [n for n in names if n.startswith(prefixes)] for kind, prefixes in parts.items()}
        named = [(_omni_name(n, stage), p) for n, p in module.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(named, stage), betas=stage.betas,
                                      fused=env.device.type == "cuda")
        if optimizer_state is not None:
            self._load_optimizer(module, optimizer, optimizer_state)
        wrapped: nn.Module = module
        if env.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            # A chat batch without images (or audio) leaves that tower unused in its backward.
            towers = ("vision_tower", "multi_modal_projector", "audio_tower", "audio_projector")
            unused = stage.kind in CHAT_KINDS and any(n.startswith(towers) for n, _ in named)
            wrapped = DistributedDataParallel(module, find_unused_parameters=unused)
        micro = stage.micro_batch_size
        if stage.kind == "contrastive" and micro is not None and micro < stage.batch_size // env.world:
            raise ConfigError(f"stage {stage.name!r}: a contrastive loss needs the whole batch at once "
                              "(no micro_batch_size)")
        source = RecordSource(stage.data)
        if stage.kind == "contrastive":
            make = pair_example(self.model.tokenizer, self.model.config, stage)
        elif stage.kind == "dpo":
            make = preference_example(self.model.processor, stage)
        elif stage.kind == "distill":
            make = distill_example(self.model.processor, teacher.processor, stage)
        elif stage.kind == "distill_vision":
            make = image_pair_example(self.model.config.vision, teacher.config.vision)
        else:
            make = chat_example(self.model.processor, stage)
        batches_class = DistillBatches if stage.kind in DISTILL_KINDS else StageBatches
        batches = batches_class(stage, make, source, self.model.tokenizer.pad_token_id, run.seed,
                                env.rank, env.world, start, micro)
        loader: Iterator = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=run.workers,
                                                            prefetch_factor=2 if run.workers else None))
        autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=run.autocast == "bfloat16")
        train_mode(omni)
        trainable = [p for _, p in named]
        window: dict[str, float] = {"loss": 0.0, "samples": 0, "steps": 0, "dropped": 0, "t": time.perf_counter()}
        take_routing_load(omni)  # MoE decoders: count expert load from this stage's first step
        with _progress_bar(self.progress, stage, start) as bar:
            for step in range(start, stage.steps):
                micro_batches, dropped = next(loader)
                factor = lr_factor(step, stage)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                loss, samples, stats = self._step(stage, module, wrapped, micro_batches, autocast)
                norm = torch.nn.utils.clip_grad_norm_(trainable, stage.clip_grad or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                window["loss"] += loss
                window["samples"] += samples
                window["steps"] += 1
                window["dropped"] += int(env.sum(dropped))
                for key, value in stats.items():
                    window[key] = window.get(key, 0.0) + value
                bar.update(step + 1, loss, samples)
                done = step + 1 == stage.steps
                if (step + 1) % run.log_every == 0 or done:
                    elapsed = time.perf_counter() - window["t"]
                    row = {"type": "train", "stage": stage.name, "step": step + 1, "global_step": self.global_step,
                           "loss": window["loss"] / window["steps"], "lr": stage.lr * factor,
                           "grad_norm": _full(norm), "samples_per_s": window["samples"] / elapsed,
                           "dropped": window["dropped"], "time": time.time()}
                    row.update({key: window[key] / window["steps"] for key in stats})
                    load = take_routing_load(omni)  # MoE decoders: each expert's share of the tokens, per layer
                    if load is not None:
                        row["expert_load"] = [[round(share, 4) for share in layer] for layer in load]
                    self.losses.append(row["loss"])
                    self._log(row)
                    window = {"loss": 0.0, "samples": 0, "steps": 0, "dropped": 0, "t": time.perf_counter()}
                evaluate_now = self.recipe.eval.every and self.global_step % self.recipe.eval.every == 0
                if evaluate_now or (done and index == len(self.recipe.stages) - 1 and self.recipe.eval.at_end):
                    self.evaluate(stage.name)
                stop = stop_after is not None and self.global_step >= stop_after
                if done or stop or self.global_step % run.save_every == 0:
                    extra_module = module if isinstance(module, (ContrastiveModule, VisionDistillModule)) else None
                    self._checkpoint(index, step + 1, module, optimizer, extra_module)
                if done and stage.kind == "contrastive" and self.dist.main and not self.fsdp:
                    # The dual encoder as this stage leaves it (later stages may retrain the encoder):
                    # export() puts it beside the model, for retrieval (tinyomni/retrieval/towers.py).
                    from tinyomni.retrieval.towers import from_contrastive_module, save_towers

                    save_towers(self.out / "towers" / stage.name,
                                from_contrastive_module(module, stage, self.model.config, self.model.tokenizer))
                if stop and not done:
                    return False
        self.reference = None
        return not (stop_after is not None and self.global_step >= stop_after
                    and index < len(self.recipe.stages) - 1)

    def _reference(self, index: int, stage: StageSpec, start: int, saved: dict[str, Tensor]) -> Reference:
        """The dpo stage's reference: its own new adapters off, a copy of everything else it trains (as
        it was at the stage's first step: taken now, or read back from the checkpoint on resume)."""
        fresh = sorted(n for n, owner in self.lora_owner.items() if owner == index and stage.lora is not None)
        inside = tuple(f"{n}." for n in fresh)
        trained = [(n, p) for n, p in self.omni.named_parameters() if p.requires_grad and not n.startswith(inside)]
        if start == 0:
            copies = {n: p.detach().clone() for n, p in trained}
        else:
            copies = {n: saved[f"reference.{n}"] for n, _ in trained if f"reference.{n}" in saved}
            if len(copies) != len(trained):
                raise ConfigError(f"stage {stage.name!r}: the checkpoint lacks the reference weights of this dpo stage")
        return Reference(self.omni, fresh, copies)

    def _teacher_model(self, stage: StageSpec) -> api.Model:
        """A distill stage's teacher: loaded once (and kept for a later stage naming the same one), in
        the precision of the frozen weights, frozen and in eval mode."""
        spec = stage.distill.teacher
        if self._teacher is None or self._teacher[0] != spec:
            self._teacher = None  # let the previous teacher go before the next one loads
            dtype = torch.bfloat16 if self.recipe.run.autocast == "bfloat16" else torch.float32
            teacher = load_teacher(spec, self.dist.device, dtype)
            self._teacher = (spec, teacher)
            self._teacher_forward = ChatForward(teacher.model)
        return self._teacher[1]

    def _stage_module(self, index: int, stage: StageSpec) -> nn.Module:
        """What the stage's forward is: the chat forward over the omni model, or a contrastive module
        around one of its encoders (its text tower seeded, so a resumed stage rebuilds it equally), or
        the vision tower with its teacher's (distill_vision; the width map seeded likewise)."""
        if stage.kind in CHAT_KINDS:
            return self.chat
        if stage.kind == "distill_vision":
            encoder, teacher = self.omni.vision_tower, self._teacher_model(stage).model.vision_tower
            if encoder is None or teacher is None:
                raise ConfigError(f"stage {stage.name!r}: the {'student' if encoder is None else 'teacher'} "
                                  "has no vision tower")
            encoder.requires_grad_(True)
            self.trained |= {n for n, p in self.omni.named_parameters() if n.startswith("vision_tower.")}
            with api._seeded(self.recipe.run.seed * 1000 + index):
                module = VisionDistillModule(encoder, teacher, stage.distill.feature_loss)
            return module.to(self.dist.device)
        config = self.model.config
        if stage.tower == "vision":
            encoder, width = self.omni.vision_tower, config.vision.hidden_size
        else:
            encoder, width = self.omni.audio_tower, config.audio.d_model
        if encoder is None:
            raise ConfigError(f"stage {stage.name!r}: the model has no {stage.tower} encoder")
        encoder.requires_grad_(not stage.lock_encoder)  # LiT: frozen, BatchNorm in eval mode (train_mode)
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

    def _sync(self, wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are averaged over processes once per step, on the last micro-batch."""
        if self.dist.world == 1:
            return contextlib.nullcontext()
        if self.fsdp:
            wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else wrapped.no_sync()

    def _step(self, stage: StageSpec, module: nn.Module, wrapped: nn.Module, micro_batches: list[Any],
              autocast: contextlib.AbstractContextManager) -> tuple[float, int, dict[str, float]]:
        """Forward and backward over the step's micro-batches; returns (global loss, global samples,
        other statistics to log)."""
        env = self.dist
        samples = env.sum(sum(b.samples for b in micro_batches))
        if stage.kind == "contrastive":
            with autocast:
                loss = wrapped(_to(micro_batches[0], env.device))
            loss.backward()
            return float(loss.detach()), int(samples), {}
        if stage.kind == "dpo":
            return self._preference_step(stage, module, wrapped, micro_batches, autocast, samples)
        if stage.kind == "distill":
            return self._distill_step(stage, wrapped, micro_batches, autocast, samples)
        if stage.kind == "distill_vision":  # each image's loss, summed, over the global count of images
            total = 0.0
            for k, batch in enumerate(micro_batches):
                with self._sync(wrapped, k == len(micro_batches) - 1):
                    with autocast:
                        loss_sum = wrapped(_to(batch, env.device))
                    (loss_sum * env.world / max(samples, 1.0)).backward()
                total += float(loss_sum.detach())
            return env.sum(total) / max(samples, 1.0), int(samples), {}
        tokens = env.sum(sum(b.target_tokens for b in micro_batches))
        total = 0.0
        for k, batch in enumerate(micro_batches):
            with self._sync(wrapped, k == len(micro_batches) - 1):
                with autocast:
                    loss_sum = wrapped(_to(batch, env.device))
                # DDP and FSDP average over processes; scaling by `world` makes that the global-batch mean.
                (loss_sum * env.world / max(tokens, 1.0)).backward()
            total += float(loss_sum.detach())
        return env.sum(total) / max(tokens, 1.0), int(samples), {}

    def _preference_step(self, stage: StageSpec, module: nn.Module, wrapped: nn.Module,
                         micro_batches: list[PreferenceBatch], autocast: contextlib.AbstractContextManager,
                         pairs: float) -> tuple[float, int, dict[str, float]]:
        """A dpo step: per micro-batch, the reference's answer log-probs (no gradient), then the policy's,
        and each loss term summed over the micro-batch and divided by its count in the global batch
        (pairs; chosen tokens for the SFT term), so accumulation and processes give one big batch."""
        env, spec = self.dist, stage.dpo
        chosen_tokens = max(env.sum(sum(b.chosen_tokens for b in micro_batches)), 1.0)
        pairs = max(pairs, 1.0)
        total = accuracy = margin = 0.0
        for k, batch in enumerate(micro_batches):
            chat = _to(batch.chat, env.device)
            with torch.no_grad(), self.reference(), autocast:
                reference = module(chat, per_row=True)
            with self._sync(wrapped, k == len(micro_batches) - 1):
                with autocast:
                    policy = wrapped(chat, per_row=True)
                terms = preference_losses(policy, reference, spec)
                loss = (spec.dpo_weight * terms["dpo"].sum() / pairs
                        + spec.quality_weight * terms["quality"].sum() / pairs
                        + spec.sft_weight * terms["nll"] / chosen_tokens)
                (loss * env.world).backward()
            total += float(loss.detach())
            accuracy += float((terms["margin"] > 0).sum()) / pairs
            margin += float(terms["margin"].sum()) / pairs
        stats = {"reward_accuracy": env.sum(accuracy), "reward_margin": env.sum(margin)}
        return env.sum(total), int(pairs), stats

    def _distill_step(self, stage: StageSpec, wrapped: nn.Module, micro_batches: list[DistillBatch],
                      autocast: contextlib.AbstractContextManager,
                      samples: float) -> tuple[float, int, dict[str, float]]:
        """A distill step: per micro-batch, the teacher's logits on the answer tokens (no gradient), the
        student's, and (1-alpha)·T²·KL + alpha·CE summed over those tokens and divided by their count in
        the global batch. Logged besides the loss: `kl` and `ce` per answer token."""
        env, spec = self.dist, stage.distill
        tokens = max(env.sum(sum(b.target_tokens for b in micro_batches)), 1.0)
        vocab = len(self.model.tokenizer)
        total = kl_sum = ce_sum = 0.0
        for k, batch in enumerate(micro_batches):
            student = _to(batch.student, env.device)
            with torch.no_grad(), autocast:
                teacher = self._teacher_forward(student if batch.teacher is None else _to(batch.teacher, env.device),
                                                logits=True)
            with self._sync(wrapped, k == len(micro_batches) - 1):
                with autocast:
                    logits = wrapped(student, logits=True)
                targets = student.labels[:, 1:]
                kl, ce = distillation_loss(logits, teacher, targets[targets != IGNORE], spec.temperature, vocab)
                loss = ((1 - spec.alpha) * spec.temperature**2 * kl + spec.alpha * ce) / tokens
                (loss * env.world).backward()
            total += float(loss.detach())
            kl_sum += float(kl.detach())
            ce_sum += float(ce.detach())
        return env.sum(total), int(samples), {"kl": env.sum(kl_sum) / tokens, "ce": env.sum(ce_sum) / tokens}

    # --- evaluation and export ---------------------------------------------------------------------
    def _plain_model(self) -> api.Model:
        """The model as one ordinary module: itself, or under FSDP (every process takes part) the full
        weights gathered into a fresh copy on the main process (others get their sharded model back)."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.omni, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.main:
            return self.model
        model = build_model(self.recipe)
        for index, stage in enumerate(self.recipe.stages):
            if stage.lora is not None:
                with api._seeded(self.recipe.run.seed * 1000 + index):
                    apply_lora(model.model, stage.lora)
        model.model.load_state_dict(full)
        return model

    def evaluate(self, stage_name: str) -> None:
        """The eval harness on a small slice of the world (main process only); scores go to the log."""
        plain = self._plain_model()
        if self.dist.main:
            from tinyomni.eval.runner import RunConfig, evaluate

            spec = self.recipe.eval
            if self._eval_items is None:
                self._eval_items = eval_items(spec)
            model = api.Model(plain.model, self.model.tokenizer, self.model.chat_template, name=self.recipe.name)
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

    def export(self, model: api.Model | None = None) -> Path:
        """The trained model as a checkpoint directory `<out>/model`, loadable by `tinyomni.load`.
        LoRA adapters are kept apart (small, the base decoder stays a reference) or merged."""
        model = model or self.model
        lora_mode = self.recipe.run.lora_export
        if lora_mode == "merged":
            merge_lora(model.model)
        config = model.config
        decoder_trained = any(n.startswith("language_model.") for n in self.trained)
        store = config.base_decoder is None or decoder_trained or (lora_mode == "merged" and self._had_lora())
        if config.base_model is not None:  # a fine-tuned whole model: only what differs from it (api.Model.save)
            store = False
        model.model.eval()
        path = model.save(self.out / MODEL_DIR, store_decoder=store)
        from tinyomni.retrieval.towers import collect_towers

        collect_towers(self.out / "towers", path)
        return path

    def _had_lora(self) -> bool:
        return any(s.lora is not None for s in self.recipe.stages)


def _distribute_like(weights: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full tensors (a checkpoint written without FSDP) as shards laid out like the model's own."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for key, value in weights.items():
        target = own.get(key.removeprefix("reference."))
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
        out[key] = value
    return out


def _full(value: Tensor) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


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
