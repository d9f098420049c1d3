"""Build the engine's C++ kernels ahead of time, cache the shared library, and load it.

    python -m tinyomni.engine.build          # once (scripts/setup.sh calls it); prints the path in use

The library is cached per user under `$TINYOMNI_ENGINE_CACHE` (default `$XDG_CACHE_HOME/tinyomni/engine`,
else `~/.cache/tinyomni/engine`; not the model cache's `TINYOMNI_CACHE`, which tests turn off) in a
folder named by a hash of the kernel sources, the compiler flags, the torch and Python versions, so
an edit or a torch upgrade builds a new one and a stale one is never loaded.
Importing tinyomni never compiles anything: without a built library (or on a CPU without AVX-512
VNNI) the engine uses the plain-PyTorch reference path and `kernel_path()` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

KERNEL_DIR = Path(__file__).parent / "kernels"
SOURCES = ("common.cpp", "int4/int4.cpp", "int8/int8.cpp", "gemm/gemm.cpp", "batched/batched.cpp", "decode.cpp",
           "bindings.cpp")
HEADERS = ("amx.h", "common.h", "decode.h")
# -ffp-contract=off: the dequantize loops must round d*q + m as the reference (and gguf) do, not fuse it.
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c",
          "-mfma", "-ffp-contract=off", "-fopenmp")
DISABLE_ENV = "TINYOMNI_ENGINE"  # "reference" forces the PyTorch path (tests, debugging)


def source_hash() -> str:
    """Hash of everything that determines the built library."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((KERNEL_DIR / name).read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.split()[0].encode())
    return digest.hexdigest()[:16]


CACHE_ENV = "TINYOMNI_ENGINE_CACHE"


def cache_dir() -> Path:
    """Where built kernels live: one sub-folder per source hash."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyomni" / "engine"


def module_name() -> str:
    return f"tinyomni_kernels_{source_hash()}"


def library_path() -> Path:
    return cache_dir() / source_hash() / f"{module_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernels (a minute or two on 2 cores) unless this source hash is already built."""
    from torch.utils import cpp_extension

    path = library_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=module_name(), sources=[str(KERNEL_DIR / s) for s in SOURCES],
                       extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=str(path.parent),
                       verbose=verbose, is_python_module=True)
    if not path.is_file():
        raise RuntimeError(f"the build finished but {path} is missing")
    return path


_loaded: tuple[ModuleType | None, str] | None = None


def load_extension() -> tuple[ModuleType | None, str]:
    """(the kernel module, "") when it is built and this CPU runs it, else (None, the reason)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if os.environ.get(DISABLE_ENV, "").lower() == "reference":
        _loaded = None, f"{DISABLE_ENV}=reference"
    else:
        path = library_path()
        if not path.is_file():
            _loaded = None, f"kernels not built (run `python -m tinyomni.engine.build`; expected {path})"
        else:
            try:
                spec = importlib.util.spec_from_file_location(module_name(), path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except (ImportError, OSError) as e:
                _loaded = None, f"could not load {path}: {e}"
            else:
                if module.cpu_supported():
                    _loaded = module, ""
                else:
                    _loaded = None, "this CPU lacks AVX-512 VNNI/F16C"
    return _loaded


def main() -> int:
    """Build step for scripts/setup.sh: never raises, says which path the engine will use."""
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as e:  # a compiler error is reported, and the PyTorch path remains
        print(f"tinyomni engine: C++ kernels not built ({type(e).__name__}: {e}); "
              "quantized models will use the plain-PyTorch path", file=sys.stderr)
        return 1
    module, reason = load_extension()
    if module is None:
        print(f"tinyomni engine: built {path}, but it is not usable here: {reason}", file=sys.stderr)
        return 1
    print(f"tinyomni engine: C++ kernels ready ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
