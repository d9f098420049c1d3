"""checkpoints/weights.py: every tensor of a safetensors checkpoint read exactly (one file or shards), a
truncated or corrupt file named in a CheckpointError, and a mapped tensor's pages gone with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinyomni.checkpoints.weights import Weights
from tinyomni.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g),
        "c.half": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
    }


def test_every_tensor_reads_back_exactly_from_one_file_or_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = Weights(tmp_path)
    assert sorted(weights.keys()) == sorted(tensors)
    for name, tensor in tensors.items():
        got = weights.get(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
    got = weights.get("a.weight")
    got += 1  # copy-on-write: the tensor is ours to change, the file is not touched
    assert torch.equal(Weights(tmp_path).get("a.weight"), tensors["a.weight"])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(tensors)
    save_file({k: tensors[k] for k in names[:3]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[3:]}, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= 3)}-of-00002.safetensors" for i, k in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = Weights(sharded)
    for name, tensor in tensors.items():
        assert torch.equal(weights.get(name), tensor), name


def test_a_truncated_or_corrupt_file_is_named(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-16])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated .*ends past the end"):
        Weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="corrupt or truncated .*not JSON"):
        Weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Weights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Weights(tmp_path)


# Run in a fresh process: in a long test session the allocator hands back pages it already holds, so
# the resident set would not show the conversion's 64 MiB.
RELEASE_PROBE = """
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from tinyomni.checkpoints.weights import Weights

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

folder = Path(sys.argv[1])
save_file({"big": torch.ones(16 * 2**20, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))  # 32 MiB
weights = Weights(folder)
fds = len(list(Path("/proc/self/fd").iterdir()))
held = [weights.get("big") for _ in range(50)]  # a map per tensor, but no file descriptor per map
print("fds", len(list(Path("/proc/self/fd").iterdir())) - fds)
del held
start = rss_mb()
mapped = weights.get("big")
print("mapped", rss_mb() - start)
converted = mapped.float()  # reads the 32 MiB, writes 64 MiB
print("converted", rss_mb() - start)
del mapped
print("dropped", rss_mb() - start)
print("sum", converted.sum().item())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_converted_tensor_releases_its_pages(tmp_path: Path) -> None:
    """The reason for a map per tensor: converting one (bf16 → fp32, as loading in float32 does) and
    dropping the original gives its file pages back, so a load peaks at the converted weights."""
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    seen = {k: float(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    assert seen["fds"] == 0
    assert seen["mapped"] < 8  # mapped, not read
    assert seen["converted"] > 80
    assert seen["dropped"] < 72  # the file's 32 MiB left with the tensor; the 64 MiB copy stays
    assert seen["sum"] == 16 * 2**20
