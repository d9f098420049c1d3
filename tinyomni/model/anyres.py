"""LLaVA-NeXT's connector (OmniConfig.image_resize "anyres"): the two-layer MLP projector, then each image's
features packed as transformers' LlavaNextModel packs them.

An image arrives as its whole-image tile and a rows × cols grid of tiles (processing/llava_next.py). After
the projector: the whole image's features come first, as they are; the grid's tiles are laid side by side
into one (rows·side) × (cols·side) feature map, the rows or columns that are only padding are cut off
(each image's `Layout`, which travels beside the pixels: `OmniModel.forward(..., image_layouts=...)`), and
a learned `image_newline` vector ends every row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tinyomni.errors import InputError
from tinyomni.model.projector import MultiModalProjector
from tinyomni.processing.llava_next import Layout


def check_layouts(pixel_values: Tensor, layouts: list[Layout] | None) -> list[Layout]:
    """The layouts of the images whose tiles `pixel_values` [tiles, 3, S, S] holds, in order; an InputError
    naming what is missing or does not add up (never a silent misread of someone else's tiles)."""
    if layouts is None:
        raise InputError("this model (LLaVA-NeXT, image_resize 'anyres') needs each image's layout with its pixel "
                         "values: image_layouts, one Layout per image (ChatProcessor makes them: "
                         "Prompt.image_layouts)")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise InputError(f"LLaVA-NeXT pixel values are [tiles, 3, S, S] (the layouts travel apart, as "
                         f"image_layouts), got {list(pixel_values.shape)}")
    if not all(isinstance(layout, Layout) for layout in layouts):
        raise InputError("image_layouts must be processing.llava_next.Layout values, one per image")
    for layout in layouts:
        # A window may be empty (a very wide image on a grid whose rows are an even number of features).
        window = 0 <= layout.top <= layout.bottom and 0 <= layout.left <= layout.right
        if layout.rows < 1 or layout.cols < 1 or not window:
            raise InputError(f"a LLaVA-NeXT image layout with no grid or a reversed window: {layout}")
    tiles = sum(layout.tiles for layout in layouts)
    if tiles != pixel_values.shape[0]:
        raise InputError(f"{pixel_values.shape[0]} tiles of pixel values for LLaVA-NeXT image layouts of {tiles} "
                         f"tiles ({len(layouts)} image(s)): pass each prompt's image_layouts with its pixel values")
    return layouts


class AnyresProjector(MultiModalProjector):
    """MultiModalProjector plus LLaVA-NeXT's `image_newline` and the packing of each image's features."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None,
                 hidden_act: str = "gelu", layer_norm: bool = False) -> None:
        super().__init__(in_features, out_features, hidden_features, hidden_act=hidden_act, layer_norm=layer_norm)
        self.image_newline = nn.Parameter(torch.zeros(out_features))

    def pack(self, features: Tensor, layouts: list[Layout]) -> Tensor:
        """[tiles, side², D] projected features of every image's tiles → [tokens, D], image after image."""
        n, tokens, width = features.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise InputError(f"LLaVA-NeXT lays tile features out on a square grid, not {tokens} per tile")
        out, at = [], 0
        for layout in layouts:
            base, grid = features[at], features[at + 1: at + layout.tiles]
            at += layout.tiles
            if layout.bottom > layout.rows * side or layout.right > layout.cols * side:
                raise InputError(f"a LLaVA-NeXT feature window {layout} outside its {layout.rows}x{layout.cols} grid")
            grid = grid.reshape(layout.rows, layout.cols, side, side, width).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(layout.rows * side, layout.cols * side, width)
            grid = grid[layout.top:layout.bottom, layout.left:layout.right]
            newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, width)
            out += [base, torch.cat([grid, newline], dim=1).reshape(-1, width)]
        if at != n:
            raise InputError(f"{n} tiles for LLaVA-NeXT images of {at} tiles")
        return torch.cat(out) if out else features.reshape(0, width)
