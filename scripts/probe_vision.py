"""Linear probe of a model's vision tower: does it encode which colours and which shapes are in a scene?

    python scripts/probe_vision.py tinyomni/models/tinyomni-world
    python scripts/probe_vision.py runs/tinyomni-world/model --random   # and a random tower of that shape
    python scripts/probe_vision.py runs/tinyomni-world/checkpoints/step-0000400   # mid-run

The tower's last hidden states on world caption scenes (train split to fit, val split to score) are
pooled (mean and max over patches), and one logistic regression per label is fitted: "is there a red
object", ..., "is there a hexagon". A tower that encodes shapes scores well above the majority guess on
the shape labels; the model card and docs/training.md quote these numbers. The LLM is not involved,
so this tells an encoder problem from a decoder one in a minute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import tinyomni
from tinyomni import world
from tinyomni.checkpoints.native import read_weights
from tinyomni.config import VisionConfig
from tinyomni.model.vision import VisionEncoder
from tinyomni.world.render import COLORS, SHAPES


def scenes(n: int, split: str, size: int, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """n caption scenes as normalised pixels [n, 3, size, size] and labels [n, colours + shapes]."""
    pixels, labels = [], []
    for index in range(n):
        sample = world.make_sample("caption", index=index, split=split, seed=0)
        image = sample.images[0].convert("RGB").resize((size, size))
        x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
        pixels.append((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
        y = torch.zeros(len(COLORS) + len(SHAPES))
        for obj in sample.meta["objects"]:
            y[list(COLORS).index(obj["color"])] = 1
            y[len(COLORS) + list(SHAPES).index(obj["shape"])] = 1
        labels.append(y)
    return torch.stack(pixels), torch.stack(labels)


@torch.no_grad()
def features(tower: VisionEncoder, pixels: torch.Tensor) -> torch.Tensor:
    out = torch.cat([tower(pixels[i : i + 50])[:, tower.num_prefix_tokens :] for i in range(0, len(pixels), 50)])
    return torch.cat([out.mean(1), out.amax(1)], -1).float()


def probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor) -> torch.Tensor:
    """Per-label validation accuracy of L2-regularised logistic regressions on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mu) / sd, (val_x - mu) / sd
    head = torch.nn.Linear(train_x.shape[1], train_y.shape[1])
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(train_x), train_y)
        loss = loss + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((head(val_x) > 0).float() == val_y).float().mean(0)


def load_tower(path: Path) -> tuple[VisionEncoder, VisionConfig]:
    """The vision tower of a model directory (or tinyomni-world), or of a training checkpoint
    (`<run>/checkpoints/step-N`, shaped by the run's recipe.json) while the run goes on."""
    if (path / "state.json").is_file() and (path / "weights.safetensors").is_file():
        recipe = json.loads((path.parent.parent / "recipe.json").read_text())
        config = VisionConfig(**recipe["model"]["vision"])
        tower = VisionEncoder(config)
        weights = read_weights(path, "weights.safetensors")
        prefix = "vision_tower."
        state = {k[len(prefix):]: v.float() if v.is_floating_point() else v
                 for k, v in weights.items() if k.startswith(prefix)}
        missing = set(tower.state_dict()) - set(state)
        if missing:
            raise SystemExit(f"{path} does not hold the whole vision tower (missing {sorted(missing)[:3]})")
        tower.load_state_dict(state)
        return tower, config
    model = tinyomni.load(str(path))
    if model.config.vision is None:
        raise SystemExit(f"{path} has no vision tower")
    return model.model.vision_tower, model.config.vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a tinyomni checkpoint directory, or tinyomni-world")
    parser.add_argument("--train", type=int, default=600, help="scenes to fit the probe on (train split)")
    parser.add_argument("--val", type=int, default=200, help="scenes to score it on (val split)")
    parser.add_argument("--random", action="store_true", help="also probe a randomly initialised tower")
    args = parser.parse_args()
    torch.manual_seed(0)
    trained, config = load_tower(Path(args.model))
    console = Console()
    with console.status(f"rendering {args.train} + {args.val} scenes"):
        train_pixels, train_y = scenes(args.train, "train", config.image_size, config.image_mean, config.image_std)
        val_pixels, val_y = scenes(args.val, "val", config.image_size, config.image_mean, config.image_std)
    towers = {"trained": trained.float().eval()}
    if args.random:
        towers["random"] = VisionEncoder(config).eval()
    table = Table(title=f"linear probe of {args.model}'s vision tower ({args.train} train / {args.val} val scenes)")
    for column in ("tower", "colour acc %", "shape acc %"):
        table.add_column(column, justify="right")
    majority = torch.maximum(val_y.mean(0), 1 - val_y.mean(0))
    colours, shapes = slice(0, len(COLORS)), slice(len(COLORS), None)
    table.add_row("majority guess", f"{100 * majority[colours].mean():.1f}", f"{100 * majority[shapes].mean():.1f}")
    for name, tower in towers.items():
        with console.status(f"encoding and probing ({name} tower)"):
            acc = probe(features(tower, train_pixels), train_y, features(tower, val_pixels), val_y)
        table.add_row(name, f"{100 * acc[colours].mean():.1f}", f"{100 * acc[shapes].mean():.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
