"""Linear probes of a model's vision tower: does it encode which colours and which shapes are in a scene,
and which colour and shape each object has?

    python diagnostics/probe_vision.py tinyomni/models/tinyomni-world
    python diagnostics/probe_vision.py runs/tinyomni-world/model --random   # and a random tower of that shape
    python diagnostics/probe_vision.py runs/tinyomni-world/checkpoints/step-0000400   # mid-run

The tower's last hidden states on world caption scenes (train split to fit, val split to score) are
pooled (mean and max over patches), and one logistic regression per label is fitted: "is there a red
object", ..., "is there a hexagon". A tower that encodes shapes scores well above the majority guess on
the shape labels; the model card and docs/training.md quote these numbers.

The second table is per object: one softmax regression reads an object's shape (and one its colour)
from the single token at the object's centre: the tower's patch there and, for a model directory,
the projected token the LLM receives there (after pixel shuffle and the projector). "What colour is
the star?" needs exactly that binding. The LLM is not involved, so this tells an encoder (or projector)
problem from a decoder one in a minute.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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


def scenes(n: int, split: str, size: int, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor,
                                                                           list[list[dict]]]:
    """n caption scenes as normalised pixels [n, 3, size, size], labels [n, colours + shapes] and each
    scene's objects (shape, colour, centre x and y as fractions of the side)."""
    pixels, labels, objects = [], [], []
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
        objects.append(sample.meta["objects"])
    return torch.stack(pixels), torch.stack(labels), objects


@torch.no_grad()
def patches(tower: VisionEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's last hidden states without prefix tokens: [n, patches, width]."""
    return torch.cat([tower(pixels[i : i + 50])[:, tower.num_prefix_tokens :] for i in range(0, len(pixels), 50)])


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([tokens.mean(1), tokens.amax(1)], -1).float()


def object_labels(objects: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every object's shape and colour index, scene by scene."""
    flat = [obj for scene in objects for obj in scene]
    return (torch.tensor([list(SHAPES).index(o["shape"]) for o in flat]),
            torch.tensor([list(COLORS).index(o["color"]) for o in flat]))


def centre_cell(obj: dict, side: int) -> int:
    """Index, in a row-major side x side token grid, of the cell holding a world object's centre."""
    row, col = min(int(obj["y"] * side), side - 1), min(int(obj["x"] * side), side - 1)
    return row * side + col


def at_centres(tokens: torch.Tensor, objects: list[list[dict]]) -> torch.Tensor:
    """Each object's token (the grid cell holding its centre) of [n, side², width] tokens, in the
    order of `object_labels`."""
    side = int(tokens.shape[1] ** 0.5)
    return torch.stack([tokens[k, centre_cell(obj, side)] for k, scene in enumerate(objects)
                        for obj in scene]).float()


def probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
          classes: int | None = None) -> torch.Tensor:
    """Validation accuracy of L2-regularised linear probes on standardised features: per label of
    multi-hot targets [n, labels] (logistic), or overall for class indices [n] (softmax, `classes`)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mu) / sd, (val_x - mu) / sd
    head = torch.nn.Linear(train_x.shape[1], classes or train_y.shape[1])
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    F = torch.nn.functional
    loss_fn = F.cross_entropy if classes else F.binary_cross_entropy_with_logits

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(head(train_x), train_y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        if classes:
            return (head(val_x).argmax(1) == val_y).float().mean()
        return ((head(val_x) > 0).float() == val_y).float().mean(0)


def load_tower(path: Path) -> tuple[VisionEncoder, VisionConfig, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The vision tower of a model directory (or tinyomni-world), or of a training checkpoint
    (`<run>/checkpoints/step-N`, shaped by the run's recipe.json) while the run goes on; and for a
    model directory, what turns pixels into the tokens the LLM receives (None for a checkpoint)."""
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
        return tower, config, None
    model = tinyomni.load(str(path))
    if model.config.vision is None:
        raise SystemExit(f"{path} has no vision tower")
    omni = model.model.eval()
    omni.vision_tower.float()  # the LLM is not needed here, so only what makes its input tokens is widened
    omni.multi_modal_projector.float()

    @torch.no_grad()
    def llm_tokens(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([omni.encode_images(pixels[i : i + 50]) for i in range(0, len(pixels), 50)])

    return omni.vision_tower, model.config.vision, llm_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a tinyomni checkpoint directory, or tinyomni-world")
    parser.add_argument("--train", type=int, default=600, help="scenes to fit the probe on (train split)")
    parser.add_argument("--val", type=int, default=200, help="scenes to score it on (val split)")
    parser.add_argument("--random", action="store_true", help="also probe a randomly initialised tower")
    args = parser.parse_args()
    torch.manual_seed(0)
    trained, config, llm_tokens = load_tower(Path(args.model))
    console = Console()
    with console.status(f"rendering {args.train} + {args.val} scenes"):
        train_pixels, train_y, train_objects = scenes(args.train, "train", config.image_size, config.image_mean,
                                                      config.image_std)
        val_pixels, val_y, val_objects = scenes(args.val, "val", config.image_size, config.image_mean,
                                                config.image_std)
    towers = {"trained": trained.float().eval()}
    if args.random:
        towers["random"] = VisionEncoder(config).eval()
    scene_table = Table(title=f"linear probe of {args.model}'s vision tower, pooled "
                              f"({args.train} train / {args.val} val scenes)")
    object_table = Table(title="per object: the token at its centre -> its shape, its colour (val objects)")
    for table, columns in ((scene_table, ("tower", "colour acc %", "shape acc %")),
                           (object_table, ("token", "shape acc %", "colour acc %"))):
        for column in columns:
            table.add_column(column, justify="right")
    majority = torch.maximum(val_y.mean(0), 1 - val_y.mean(0))
    colours, shapes = slice(0, len(COLORS)), slice(len(COLORS), None)
    scene_table.add_row("majority guess", f"{100 * majority[colours].mean():.1f}",
                        f"{100 * majority[shapes].mean():.1f}")
    train_labels, (val_shapes, val_colours) = object_labels(train_objects), object_labels(val_objects)
    object_table.add_row("majority guess", f"{100 * val_shapes.bincount().max() / len(val_shapes):.1f}",
                         f"{100 * val_colours.bincount().max() / len(val_colours):.1f}")

    def add_object_row(name: str, train_tokens: torch.Tensor, val_tokens: torch.Tensor) -> None:
        train_x, val_x = at_centres(train_tokens, train_objects), at_centres(val_tokens, val_objects)
        object_table.add_row(name, f"{100 * probe(train_x, train_labels[0], val_x, val_shapes, len(SHAPES)):.1f}",
                             f"{100 * probe(train_x, train_labels[1], val_x, val_colours, len(COLORS)):.1f}")

    for name, tower in towers.items():
        with console.status(f"encoding and probing ({name} tower)"):
            train_tokens, val_tokens = patches(tower, train_pixels), patches(tower, val_pixels)
            acc = probe(pooled(train_tokens), train_y, pooled(val_tokens), val_y)
            scene_table.add_row(name, f"{100 * acc[colours].mean():.1f}", f"{100 * acc[shapes].mean():.1f}")
            add_object_row(f"{name} tower's patch", train_tokens, val_tokens)
    if llm_tokens is not None:
        with console.status("projecting and probing (the LLM's input tokens)"):
            add_object_row("LLM input token (projected)", llm_tokens(train_pixels), llm_tokens(val_pixels))
    console.print(scene_table)
    console.print(object_table)

if __name__ == "__main__":
    main()
