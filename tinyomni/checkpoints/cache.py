"""The load cache: a model as `tinyomni.load` built it (a GGUF decoder dequantized, a LoRA adapter
merged, or kept apart over quantized blocks, the weights cast), kept as a complete checkpoint
directory keyed by the hashes of the files it was built from, so the next load reads one
safetensors file instead of building it again.

- A key is a hash of the source files' contents (sha256; remembered per path, size and mtime in
  `digests.json`, so a 100 MB GGUF is hashed once, not at every load) and of the load's options (dtype).
  Change any source file and the key changes: a stale entry is never used, only left to be pruned.
- An entry is written atomically (`native.atomic_directory`): it is complete or absent.
- `TINYOMNI_CACHE=DIR` puts the cache elsewhere; `TINYOMNI_CACHE=off` turns it off. The default is
  `~/.cache/tinyomni/models` (or `$XDG_CACHE_HOME/tinyomni/models`). It keeps at most
  `TINYOMNI_CACHE_MAX_GB` (default 10) GiB: the entries used longest ago go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from tinyomni.checkpoints.native import CONFIG_FILE, atomic_directory

FORMAT = 2  # bump when what an entry holds changes: old entries then simply miss
# 2: a quantized entry of a model with a LoRA adapter keeps the adapter apart (engine/lora.py), where
# 1 held it merged and requantized (int8 over a 4-bit GGUF base)
INFO_FILE = "cache_info.json"  # what a built Model knows beyond its checkpoint files (name, flags)
CACHE_ENV = "TINYOMNI_CACHE"
MAX_GB_ENV = "TINYOMNI_CACHE_MAX_GB"


def cache_root() -> Path | None:
    """Where entries live, or None when the cache is off."""
    setting = os.environ.get(CACHE_ENV)
    if setting is not None and setting.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if setting:
        return Path(setting).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tinyomni" / "models"


def file_digest(path: Path, root: Path | None) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime, inode) in the cache's digests.json."""
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    index_file = root / "digests.json" if root is not None else None
    index: dict[str, list[str]] = {}
    if index_file is not None and index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError):
            index = {}  # a damaged index only costs a re-hash
    known = index.get(str(path.resolve()))
    if known is not None and known[0] == stamp:
        return known[1]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    digest = sha.hexdigest()
    if index_file is not None:
        index[str(path.resolve())] = [stamp, digest]
        try:
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_file.with_name(f".digests-{os.getpid()}.json")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_file)
        except OSError:
            pass  # a read-only cache still works, it just hashes again next time
    return digest


def entry_key(sources: Iterable[Path], **options: object) -> str:
    """The key of what `sources` (files; a directory stands for the files in it) build with `options`."""
    root = cache_root()
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        files += sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    parts = [f"format={FORMAT}"] + [f"{k}={options[k]}" for k in sorted(options)]
    parts += [f"{p.name}:{file_digest(p, root)}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def find(key: str) -> Path | None:
    """The entry's directory if the cache has it whole."""
    root = cache_root()
    if root is None:
        return None
    entry = root / key
    if not ((entry / CONFIG_FILE).is_file() and (entry / INFO_FILE).is_file()):
        return None
    try:
        os.utime(entry / INFO_FILE)  # "used now", for pruning
    except OSError:
        pass
    return entry


def store(key: str, write: Callable[[Path], None], info: dict) -> Path | None:
    """Write an entry (atomically) with `write(tmp_dir)` plus its info; None when the cache is off or
    cannot be written (a full or read-only disk must never fail a load)."""
    root = cache_root()
    if root is None:
        return None

    def write_all(tmp: Path) -> None:
        write(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    try:
        entry = atomic_directory(root / key, write_all)
    except OSError:
        return None
    prune(root, keep=entry)
    return entry


def prune(root: Path, keep: Path | None = None) -> None:
    """Remove the entries used longest ago until the cache fits in TINYOMNI_CACHE_MAX_GB."""
    try:
        limit = float(os.environ.get(MAX_GB_ENV, "10")) * 2**30
    except ValueError:
        limit = 10 * 2**30
    entries = []
    for entry in root.iterdir():
        info = entry / INFO_FILE
        if entry.is_dir() and info.is_file():
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            entries.append((info.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            total -= size


def read_info(entry: Path) -> dict:
    return json.loads((entry / INFO_FILE).read_text())
