"""Activation functions by the names Hugging Face configs use, shared by every encoder.

`ACT2FN` maps a config's `hidden_act` / `activation_function` string to a plain callable on tensors.
Its keys are exactly `tinyomni.config.ACTIVATIONS`, so a config that validates always finds its function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tinyomni.errors import ConfigError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; CLIP weights were trained with it, not with erf GELU."""
    return x * torch.sigmoid(1.702 * x)


ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    # transformers' "gelu_new" is the same tanh formula written out by hand; PyTorch's kernel agrees
    # with it to rounding, so one function serves both names.
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name`, or a ConfigError listing the names we know."""
    try:
        return ACT2FN[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; known: {', '.join(sorted(ACT2FN))}") from None
