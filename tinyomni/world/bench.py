"""world-bench: the world's standard evaluation suite, a fixed test split of every skill.

Version 1 is seed 0, split "test" (held-out compositions, words and voices), default difficulty, 50
samples per skill. Anyone who generates it gets the same bytes, so scores are comparable; a changed
generator must bump BENCH_VERSION rather than silently change the suite.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tinyomni.world.writers import write_dataset

BENCH_VERSION = "v1"
BENCH_NAME = f"world-bench-{BENCH_VERSION}"
BENCH_SEED = 0
BENCH_N = 50


def write_bench(out: str | Path, n: int = BENCH_N, skills: Sequence[str] | str | None = None,
                workers: int = 1, progress: bool = False) -> Path:
    """Write world-bench into `out` (world-bench.jsonl + media/) and return the JSONL path."""
    return write_dataset(out, skills=skills, n=n, split="test", seed=BENCH_SEED, name="world-bench",
                         workers=workers, progress=progress)


def default_bench_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tinyomni" / BENCH_NAME


def ensure_bench(folder: str | Path | None = None, n: int = BENCH_N, workers: int = 1,
                 progress: bool = False) -> Path:
    """The world-bench JSONL in `folder` (default ~/.cache/tinyomni/world-bench-v1), generated on
    first use; regenerated if it was made with other settings or left unfinished."""
    folder = Path(folder) if folder is not None else default_bench_dir()
    jsonl, manifest = folder / "world-bench.jsonl", folder / "world-bench.json"
    done = folder / ".complete"
    if done.exists() and manifest.exists() and json.loads(manifest.read_text()).get("n_per_skill") == n:
        return jsonl
    done.unlink(missing_ok=True)
    write_bench(folder, n=n, workers=workers, progress=progress)
    done.write_text(BENCH_NAME + "\n")
    return jsonl
