"""LoRA: a low-rank update `B @ A` beside a frozen `nn.Linear`, trained instead of the full weight.

`LoRALinear` is an `nn.Linear` (same call, same `weight`/`bias` names, so the base weights keep their
checkpoint names) with two extra linears named as in peft, `lora_A` [r, in] and `lora_B` [out, r];
`lora_B` starts at zero, so a freshly wrapped model computes exactly what it did before. The adapter
can be merged into the weight (`merge_lora`) for export and fast inference, or kept apart and saved
as `adapter_model.safetensors` + `adapter_config.json` next to a checkpoint (see api.Model.save).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Linear layers whose last name part is one of these get an adapter, within `scope`.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    scope: str = "language_model"  # a module-name prefix; "" = the whole model

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, r: int, alpha: float,
                 dropout: float = 0.0, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # As peft: A like a Linear's default init, B zero, so the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def wrap(cls, linear: nn.Linear, config: LoraConfig) -> LoRALinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config.r, config.alpha,
                    config.dropout, device=w.device, dtype=w.dtype)
        # Share the base tensors rather than copy them (and keep them frozen).
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear with `W + scaling * B @ A` (the base weight is not modified in place)."""
        w = self.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(w.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def apply_lora(model: nn.Module, config: LoraConfig, names: Sequence[str] | None = None) -> list[str]:
    """Wrap the target linears of `model` (or exactly the modules `names`) in LoRALinear; returns the
    wrapped module names. Layers already wrapped are left as they are, so applying twice is harmless."""
    if names is None:
        names = [n for n, m in model.named_modules()
                 if type(m) is nn.Linear and n.startswith(config.scope) and n.rsplit(".", 1)[-1] in config.targets]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if isinstance(module, LoRALinear):
            continue
        if type(module) is not nn.Linear:
            raise TypeError(f"LoRA needs an nn.Linear at {name}, found {type(module).__name__}")
        setattr(parent, child, LoRALinear.wrap(module, config))
    return list(names)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a plain Linear holding the merged weight; returns how many."""
    layers = lora_modules(model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.merged())
    return len(layers)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model`'s tensors with every LoRA adapter merged into its weight: the network as it computes,
    under the base names (what an exporter writes), without changing the model."""
    state = model.state_dict()
    for name, layer in lora_modules(model).items():
        state[f"{name}.weight"] = layer.merged().weight.detach()
    return {k: v for k, v in state.items() if not is_lora_key(k)}


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_config(model: nn.Module) -> dict | None:
    """What `load_adapter` needs to rebuild the adapter layers: rank, alpha and module names."""
    layers = lora_modules(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {"format": "tinyomni-lora", "r": first.r, "lora_alpha": first.alpha, "target_modules": sorted(layers)}


def load_adapter(model: nn.Module, config: dict, state: dict[str, Tensor], merge: bool = True) -> None:
    """Rebuild the adapter layers named in `config`, load their weights and (by default) merge them."""
    lora = LoraConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]))
    apply_lora(model, lora, names=config["target_modules"])
    expected = {k for k in model.state_dict() if is_lora_key(k)}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
    if merge:
        merge_lora(model)
