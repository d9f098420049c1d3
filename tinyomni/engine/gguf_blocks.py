"""GGUF quantized tensors read straight into the kernels' layouts, without a dequantize→requantize trip.

Q4_0 (fp16 d, 16 bytes of nibbles; w = d*(q-8)) and Q4_1 (fp16 d, fp16 m, nibbles; w = d*q + m) become
int4 blocks (Q4_0 with m = -8d, exact in fp16); Q8_0 (fp16 d, 32 int8 codes) becomes int8 blocks
(codes + 128, m = -128d, exact). Codes are unpacked from the file's bytes as integers (no float pass) in the
canonical layout (see kernels/int4/reference.py), then packed for the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tinyomni.engine.kernels.activations import QK

# GGML type name -> bytes per block of 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass
class Blocks:
    """One weight matrix in the canonical layout: kind "int4" (codes 0..15) or "int8" (codes 0..255),
    codes uint8 [N, blocks, 32], scales and mins int16 holding fp16 bits [N, blocks]; w = d*q + m."""

    kind: str
    codes: Tensor
    scales: Tensor
    mins: Tensor
    in_features: int

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    def take_rows(self, order: np.ndarray | Tensor) -> Blocks:
        """These blocks with their rows picked/reordered (e.g. llama.cpp's q/k head permutation undone)."""
        index = order if isinstance(order, Tensor) else torch.from_numpy(np.ascontiguousarray(order))
        return Blocks(self.kind, self.codes[index].contiguous(), self.scales[index].contiguous(),
                      self.mins[index].contiguous(), self.in_features)


def supported(type_name: str) -> bool:
    return type_name in BLOCK_BYTES


def read_blocks(tensor) -> Blocks:
    """A `gguf.ReaderTensor` of type Q4_0, Q4_1 or Q8_0 → `Blocks` (copies out of the file's mmap)."""
    kind_name = tensor.tensor_type.name
    if kind_name not in BLOCK_BYTES:
        raise ValueError(f"GGUF tensor {tensor.name} is {kind_name}; only {sorted(BLOCK_BYTES)} are read as blocks")
    in_features = int(tensor.shape[0])  # GGUF lists the fastest dimension first
    rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
    nb = in_features // QK
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, nb, BLOCK_BYTES[kind_name])
    d = np.ascontiguousarray(raw[..., 0:2]).view(np.int16)[..., 0]
    if kind_name == "Q8_0":  # w = d*q, q in -127..127  →  d*(q + 128) + (-128d)
        codes = (np.ascontiguousarray(raw[..., 2:34]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        m = (-128 * d.view(np.float16).astype(np.float32)).astype(np.float16).view(np.int16)
        return Blocks("int8", torch.from_numpy(codes), torch.from_numpy(d.copy()), torch.from_numpy(m), in_features)
    if kind_name == "Q4_1":
        m = np.ascontiguousarray(raw[..., 2:4]).view(np.int16)[..., 0]
        codes = raw[..., 4:20]
    else:  # Q4_0: w = d*q - 8d, an exact fp16 min
        m = (-8 * d.view(np.float16).astype(np.float32)).astype(np.float16).view(np.int16)
        codes = raw[..., 2:18]
    nibbles = np.concatenate([codes & 0x0F, codes >> 4], axis=-1)  # value j low, j+16 high
    return Blocks("int4", torch.from_numpy(nibbles), torch.from_numpy(d.copy()), torch.from_numpy(m.copy()),
                  in_features)


def unpermute_order(rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's per-head (pairs → halves) permutation of q/k weights."""
    from tinyomni.checkpoints.gguf import unpermute_qk

    return unpermute_qk(np.arange(rows)[:, None], n_heads)[:, 0]


# --- a minimal GGUF index: tensor names, types, shapes and data offsets -----------------------------
# gguf.GGUFReader parses every metadata field into numpy views (~9 s for SmolLM2's 49k-token
# vocabulary here); the engine only needs where each tensor's bytes are, which this reads in ms.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass
class FileTensor:
    """One tensor of a GGUF file: enough for `read_blocks` (the same attributes gguf's ReaderTensor has)."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: list[int]  # fastest dimension first, as GGUF lists them
    data: np.ndarray  # the raw bytes, a view of the file's memory map


def index_tensors(path) -> list[FileTensor]:
    """The tensors of a GGUF file (v2/v3), as views of a read-only memory map."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = memoryview(buf)
    if bytes(raw[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24
    alignment = 32

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", raw, at)
        return bytes(raw[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

    def skip(kind: int, at: int) -> int:
        if kind == _STRING:
            (n,) = struct.unpack_from("<Q", raw, at)
            return at + 8 + n
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", raw, at)
            at += 12
            if item in _SCALAR_SIZES:
                return at + count * _SCALAR_SIZES[item]
            for _ in range(count):
                at = skip(item, at)
            return at
        return at + _SCALAR_SIZES[kind]

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if key == "general.alignment" and kind == _UINT32:
            (alignment,) = struct.unpack_from("<I", raw, pos)
        pos = skip(kind, pos)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", raw, pos + 4))
        kind, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, GGMLQuantizationType(kind), offset))
    start = pos + (-pos % alignment)
    tensors = []
    for name, dims, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(dims)) // block * size
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        data = buf[start + offset:start + offset + nbytes].reshape(rows, -1)
        tensors.append(FileTensor(name, kind, [int(d) for d in dims], data))
    return tensors
