"""The tensors of a safetensors checkpoint (one file, or the shards of `model.safetensors.index.json`),
each read on demand as its own copy-on-write memory map of the file.

Why not safetensors' `safe_open(...).get_tensor`: it maps the whole file once, so while any tensor of
it lives, every page read stays resident. Converting a bf16 checkpoint to fp32 then peaked at the fp32
weights plus the whole bf16 file (1.5x the loaded weights, measured on InternVL2.5-1B's shape); with a
map per tensor a converted tensor's pages go when the conversion replaces it (1.0x), and a model
loaded in the file's dtype still reads nothing until it runs (the weights stay in the page cache, one
copy in RAM). The maps hold no file descriptors (see `_map`). The file's table is checked against its
size first: a tensor past the end of a truncated file would otherwise be a SIGBUS when first touched.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyomni.errors import CheckpointError

# safetensors' dtype names → torch's.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    size: int  # bytes


class Weights:
    """A checkpoint directory's tensors by name (see the module doc); `get` maps one."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{index} is not valid JSON: {e}") from None
            files = [path / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{path}: weight shard(s) listed in {index.name} are missing: "
                                      f"{', '.join(absent)}")
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json) in {path}")
        self.where: dict[str, Stored] = {}
        for file in files:
            self.where.update(read_header(file))

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        return map_tensor(self.where[key])


def map_tensor(stored: Stored) -> torch.Tensor:
    """One stored tensor as a tensor over its own copy-on-write map of the file (nothing read yet)."""
    if stored.size == 0:
        return torch.empty(stored.shape, dtype=stored.dtype)
    base = stored.start - stored.start % mmap.ALLOCATIONGRANULARITY  # maps start on a page
    buffer = _map(stored.file, base, stored.start + stored.size - base)
    # the tensor holds the buffer; when the last view of it goes, the map (and its pages) go too
    flat = torch.frombuffer(buffer, dtype=stored.dtype, count=stored.size // stored.dtype.itemsize,
                            offset=stored.start - base)
    return flat.reshape(stored.shape)


def _map(file: Path, offset: int, length: int) -> Any:
    """A writable private (copy-on-write) map of `length` bytes of `file` from `offset`, unmapped when
    the returned buffer is collected. On POSIX through libc, holding no file descriptor: Python's mmap
    keeps a duplicate descriptor per map, and a model has hundreds of tensors (the usual limit is 1024)."""
    if _LIBC is None:  # Windows
        with open(file, "rb") as f:
            return mmap.mmap(f.fileno(), length, offset=offset, access=mmap.ACCESS_COPY)
    fd = os.open(file, os.O_RDONLY)
    try:
        address = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, offset)
    finally:
        os.close(fd)  # the map keeps the file open by itself
    if address in (None, ctypes.c_void_p(-1).value):
        raise CheckpointError(f"cannot map {length} bytes of {file}: {os.strerror(ctypes.get_errno())}")
    buffer = (ctypes.c_char * length).from_address(address)
    weakref.finalize(buffer, _LIBC.munmap, address, length)
    return buffer


def _libc() -> Any:
    if os.name == "nt":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()


def read_header(file: Path) -> dict[str, Stored]:
    """A safetensors file's table of tensors, checked against the file's size (a truncated file would
    otherwise fail with SIGBUS when a tensor past its end is first touched)."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is corrupt or truncated ({why})")

    total = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("no header")
        length = int.from_bytes(head, "little")
        if length > total - 8:
            raise corrupt(f"a {length}-byte header in a {total}-byte file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a table")
    out: dict[str, Stored] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has an unreadable entry {info!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise corrupt(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} of {info['dtype']}")
        if 8 + length + end > total:
            raise corrupt(f"tensor {name!r} ends past the end of the file")
        out[name] = Stored(file, dtype, shape, 8 + length + begin, end - begin)
    return out


def rename_weights(weights: Weights, layout: dict[str, str], tables: dict[str, Callable[[str], str | None]],
                   our_prefix: dict[str, str], where: str, family: str,
                   dropped: re.Pattern[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a family's checkpoint under our name, mapped (not read).

    A key belongs to the part whose `layout` prefix it starts with (the longest one); that part's
    table maps the rest of its name: to our name under `our_prefix[part]`, to "" for a tensor nothing
    reads (skipped), or to None. Keys no part claims, or that a table maps to None, are one
    CheckpointError naming them: never a silently dropped weight. `dropped`: names skipped outright
    (buffers transformers writes and recomputes, e.g. rotary inverse frequencies).
    """
    parts = sorted(layout.items(), key=lambda item: -len(item[1]))
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in weights.keys():
        part = next((p for p, prefix in parts if key.startswith(prefix)), None)
        name = key[len(layout[part]):] if part else ""
        if part is not None and dropped is not None and dropped.search(name):
            continue
        ours = tables[part](name) if part in tables else None
        if ours == "":
            continue
        if ours is None:
            unknown.append(key)
            continue
        state[our_prefix[part] + ours] = weights.get(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointError(f"{where}: unknown {family} weight(s) {shown}")
    return state
