"""LLaVA-NeXT's connector (OmniConfig.image_resize "anyres"): the two-layer MLP projector, then each image's
features packed as transformers' LlavaNextModel packs them.

An image arrives as its whole-image tile and a rows × cols grid of tiles (processing/llava_next.py). After
the projector: the whole image's features come first, as they are; the grid's tiles are laid side by side
into one (rows·side) × (cols·side) feature map, the rows or columns that are only padding are cut off
(the window the processor wrote into the layout), and a learned `image_newline` vector ends every row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tinyomni.errors import InputError
from tinyomni.model.projector import MultiModalProjector
from tinyomni.processing.llava_next import Layout


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
