"""The perceiver resampler connector (ProjectorConfig.kind "resampler"): Idefics2's, also the design of
xGen-MM / BLIP-3.

A tile's vision features, however many, become a fixed number of decoder embeddings:

1. `modality_projection`, a gated MLP (down(act(gate(x)) * up(x)), no biases), maps each feature to the
   decoder width;
2. `perceiver_resampler`: `resampler_n_latents` learned latent vectors go through `resampler_depth` blocks.
   In each block the (RMS-normed) latents are the queries and the normed features with the latents after
   them are the keys and values (grouped-query attention), then a gated MLP; residual around both. A
   final RMSNorm gives the tile's tokens.

Parameter names are transformers' `Idefics2Connector` names (`modality_projection.gate_proj`,
`perceiver_resampler.layers.N.self_attn.q_proj`, ...), so Idefics2 connector weights load as they are.
A padding mask (features of padding patches, for tiles of different sizes padded into one tensor) keeps
those features out of the keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyomni.config import ProjectorConfig
from tinyomni.errors import InputError
from tinyomni.model.activations import get_activation
from tinyomni.model.vision import RMSNorm


class GatedMLP(nn.Module):
    """down(act(gate(x)) · up(x)), bias-free (transformers' Idefics2MLP)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(in_features, hidden_features, bias=False)
        self.up_proj = nn.Linear(in_features, hidden_features, bias=False)
        self.down_proj = nn.Linear(hidden_features, out_features, bias=False)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    """The latents attend to [context ; latents]: queries from the latents only, keys and values from both,
    with fewer key/value heads than query heads (GQA)."""

    def __init__(self, hidden_size: int, config: ProjectorConfig) -> None:
        super().__init__()
        self.num_heads = config.resampler_n_heads
        self.num_kv_heads = config.resampler_n_kv_heads
        self.head_dim = config.resampler_head_dim
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """latents [N, L, D], context [N, T, D], mask [N, T + L] bool (True: attend) or None."""
        n, n_latents, _ = latents.shape
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(n, n_latents, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(both).view(n, both.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(both).view(n, both.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :],
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, n_latents, -1))


class PerceiverLayer(nn.Module):
    """latents + attn(norm(latents), norm(context)), then + mlp(norm(latents)); the MLP is 4× wide."""

    def __init__(self, hidden_size: int, config: ProjectorConfig) -> None:
        super().__init__()
        eps = config.resampler_rms_norm_eps
        self.input_latents_norm = RMSNorm(hidden_size, eps=eps)
        self.input_context_norm = RMSNorm(hidden_size, eps=eps)
        self.self_attn = PerceiverAttention(hidden_size, config)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=eps)
        self.mlp = GatedMLP(hidden_size, 4 * hidden_size, hidden_size, config.resampler_hidden_act)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, hidden_size: int, config: ProjectorConfig) -> None:
        super().__init__()
        # Idefics2 starts its latents at ones; from scratch, random ones give each latent its own query.
        self.latents = nn.Parameter(torch.randn(config.resampler_n_latents, hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(hidden_size, config) for _ in range(config.resampler_depth))
        self.norm = RMSNorm(hidden_size, eps=config.resampler_rms_norm_eps)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """context [N, T, D] → [N, n_latents, D]; `mask` [N, T] (True: a real feature) or None."""
        n = context.shape[0]
        latents = self.latents.to(context.dtype).expand(n, -1, -1)
        if mask is not None:  # the latents themselves are always attended to
            mask = torch.cat([mask, mask.new_ones(n, latents.shape[1])], dim=1)
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class ResamplerConnector(nn.Module):
    """Vision features [N, T, in_features] (+ mask [N, T]) → [N, resampler_n_latents, out_features]."""

    def __init__(self, in_features: int, out_features: int, config: ProjectorConfig) -> None:
        super().__init__()
        config.validate()
        self.modality_projection = GatedMLP(in_features, config.hidden_size or out_features, out_features,
                                            config.hidden_act)
        self.perceiver_resampler = PerceiverResampler(out_features, config)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and mask.shape != features.shape[:2]:
            raise InputError(f"the resampler's mask has shape {tuple(mask.shape)} for features of shape "
                             f"{tuple(features.shape)}")
        return self.perceiver_resampler(self.modality_projection(features), mask)


def split_padding(pixel_values: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tiles, maybe padded (NaN where padding: image_resize "native") → (the pixels cropped to whole patches,
    with zeros for NaN; the patch mask [N, H/p, W/p], True where every pixel of the patch is image, or None
    when there is no padding). The same pixels and mask as Idefics2 gets from its processor's zero padding
    and pixel mask; its patch embedding (a convolution without padding) also drops the rows and columns
    of pixels that make no whole patch."""
    n, _, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise InputError(f"tiles of {height}x{width} px hold no whole {patch_size}-px patch")
    pixel_values = pixel_values[:, :, : rows * patch_size, : cols * patch_size]
    padding = torch.isnan(pixel_values)
    if not bool(padding.any()):
        return pixel_values, None
    image = ~padding.any(dim=1)
    patch_mask = image.reshape(n, rows, patch_size, cols, patch_size).all(dim=4).all(dim=2)
    return torch.nan_to_num(pixel_values, nan=0.0), patch_mask
