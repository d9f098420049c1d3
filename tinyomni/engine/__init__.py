"""tinyomni's fast CPU engine: weight-only int8/int4 linears swapped into a built model.

The model code never imports this package; it walks a built `OmniModel` and replaces modules:

    import tinyomni
    from tinyomni.engine import quantize_model, kernel_path
    model = tinyomni.load("smollm2")
    quantize_model(model.model, "int4")    # or "int8"; GGUF blocks are read as they are
    print(kernel_path())                   # "cpp-avx512-vnni", or "pytorch-reference (why)"

Build the C++ kernels once with `python -m tinyomni.engine.build` (scripts/setup.sh does).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; resolved on first use so that `python -m tinyomni.engine.build` runs the build
# module fresh (not already imported by this package) and importing the package loads nothing heavy.
_EXPORTS = {
    "QuantEmbedding": "modules", "QuantLinear": "modules",
    "kernel_path": "ops", "has_extension": "ops", "use_reference": "ops",
    "quantize_model": "quantize", "quantize_module": "quantize", "quantize_weight": "quantize", "describe": "quantize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinyomni.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tinyomni.engine.{_EXPORTS[name]}"), name)
