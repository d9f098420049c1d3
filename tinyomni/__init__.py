"""tinyomni: small omni-modal language models (text, images, video, speech → text) on a laptop CPU."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tinyomni.config import AudioConfig, DecoderConfig, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError, ContextLengthError, InputError, TinyOmniError

if TYPE_CHECKING:
    from tinyomni.api import Model, load, tiny_random_model

# The API (and torch with it) is imported on first use, so a command that needs no model (`tinyomni
# --help`, `tinyomni world ...`) starts without it; `tinyomni.load` is there as before.
_LAZY = {"Model": "tinyomni.api", "load": "tinyomni.api", "tiny_random_model": "tinyomni.api"}

__version__ = "0.1.0"
__all__ = [
    "AudioConfig", "CheckpointError", "ConfigError", "ContextLengthError", "DecoderConfig", "InputError",
    "Model", "OmniConfig", "ProjectorConfig", "TinyOmniError", "VisionConfig", "load", "tiny_random_model",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tinyomni' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value
