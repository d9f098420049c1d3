"""Aria's projector (ProjectorConfig.kind "aria"): learned queries cross-attend to the vision tower's features.

    queries [Q, Dv] ─ LayerNorm ─ q_proj ─┐
    features [P, Dv] ─ LayerNorm ─ k_proj, v_proj ─ MultiheadAttention (the tower's heads) ─ linear
        ─ LayerNorm ─ linear_in ─ GELU (tanh) ─ linear_out → [Q, D decoder]

Q tokens per tile, whatever its content. There is no residual connection around the attention (as in Aria),
and the attention's own in-projection follows q/k/v_proj (two projections in a row, as Aria's checkpoints
hold them; nn.MultiheadAttention keeps the second's names: `in_proj_weight`, `out_proj`). Names follow
transformers' AriaProjector, so its tensors load as they are.

Tiles come padded (processing/aria.py: NaN pixels bottom-right); `aria_padding` turns them back into what
Aria's vision tower and projector see: the normalised zero in the padding, and a patch mask (True: a patch
with at least one image pixel) that the tower and the cross-attention honour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AriaCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_kv = nn.LayerNorm(dim)

    def forward(self, features: Tensor, queries: Tensor, padding: Tensor | None) -> Tensor:
        """features [N, P, Dv], queries [N, Q, Dv], padding [N, P] (True: ignore) → [N, Q, Dv]."""
        q = self.q_proj(self.layer_norm(queries))
        kv = self.layer_norm_kv(features)
        out, _ = self.multihead_attn(q, self.k_proj(kv), self.v_proj(kv), key_padding_mask=padding,
                                     need_weights=False)
        return self.linear(out)


class AriaProjectorMLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(in_features, hidden_features, bias=False)
        self.linear_out = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_out(F.gelu(self.linear_in(x), approximate="tanh"))


class AriaProjector(nn.Module):
    """[N, P, Dv] tower features (+ patch mask [N, P], True: image) → [N, num_queries, D decoder]."""

    def __init__(self, vision_dim: int, heads: int, out_dim: int, num_queries: int, query_rows: int | None = None,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.zeros(query_rows or num_queries, vision_dim))
        nn.init.trunc_normal_(self.query, std=0.02)  # Aria's initialisation (a checkpoint overwrites it)
        self.cross_attn = AriaCrossAttention(vision_dim, heads)
        self.layer_norm = nn.LayerNorm(vision_dim)
        self.feed_forward = AriaProjectorMLP(vision_dim, hidden_dim or out_dim, out_dim)

    def forward(self, features: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        queries = self.query[: self.num_queries].unsqueeze(0).expand(features.shape[0], -1, -1)
        padding = None if patch_mask is None else ~patch_mask
        return self.feed_forward(self.layer_norm(self.cross_attn(features, queries, padding)))


def aria_padding(pixel_values: Tensor, patch_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> tuple[Tensor, Tensor | None]:
    """Tiles [N, 3, S, S] with NaN padding → (the pixels with the normalised zero, (0 - mean) / std, in the
    padding, as Aria's processor pads before normalising; the patch mask [N, S/p, S/p], True where a patch
    holds at least one image pixel, or None when nothing is padded)."""
    padding = torch.isnan(pixel_values)
    if not bool(padding.any()):
        return pixel_values, None
    n, _, height, width = pixel_values.shape
    zero = (-torch.tensor(mean, dtype=pixel_values.dtype) / torch.tensor(std, dtype=pixel_values.dtype))
    pixels = torch.where(padding, zero.view(1, 3, 1, 1).to(pixel_values.device), pixel_values)
    image = ~padding.all(dim=1)
    rows, cols = height // patch_size, width // patch_size
    image = image[:, : rows * patch_size, : cols * patch_size]
    patch_mask = image.reshape(n, rows, patch_size, cols, patch_size).any(dim=4).any(dim=2)
    return pixels, patch_mask
