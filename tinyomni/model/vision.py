"""The vision tower: a pre-norm ViT that turns image tiles into one feature vector per patch.

One module covers SigLIP-, CLIP- and InternViT-shaped encoders; `VisionConfig` switches the
differences (CLS token, pre-layernorm, RMSNorm, layer scale, QK-norm, activation). Parameter names
follow transformers' SigLIP (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...) so
that importing a Hugging Face tower is a rename (see `tinyomni.checkpoints.hf_vision`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyomni.config import VisionConfig
from tinyomni.errors import InputError
from tinyomni.model.activations import get_activation


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, like InternViT's, so bf16 weights give the same statistics."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _block_norm(config: VisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class ConvStemBlock(nn.Module):
    """3x3 stride-2 conv → BatchNorm → GELU: halves the image side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class VisionEmbeddings(nn.Module):
    """Patch embedding (+ CLS token) + learned absolute positions, resized when the grid differs.

    The patch embedding is one patch_size-stride conv (SigLIP, CLIP, InternViT), or with
    `config.conv_stem` a stack of stride-2 conv blocks and a 3x3 conv to the width. Trained from scratch
    on scenes of shapes, the one-step embedding learnt colours but hardly shapes, while a small conv
    net with BatchNorm learnt them in a few thousand samples (measurements in docs/training.md).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.conv_stem: nn.Sequential | None = None
        if config.conv_stem:
            channels = (config.num_channels, *config.conv_stem)
            self.conv_stem = nn.Sequential(*(ConvStemBlock(a, b) for a, b in zip(channels, channels[1:])))
            self.patch_embedding = nn.Conv2d(channels[-1], config.hidden_size, kernel_size=3, padding=1)
        else:
            self.patch_embedding = nn.Conv2d(
                config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
            )
        self.num_prefix_tokens = 1 if config.use_cls_token else 0
        if config.use_cls_token:
            self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.register_parameter("class_embedding", None)
        num_positions = config.num_patches + self.num_prefix_tokens
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)
        self.position_buckets = config.position_buckets

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings [prefix + grid_h*grid_w, D] for a grid_h × grid_w patch grid."""
        weight = self.position_embedding.weight
        if self.position_buckets:
            return weight[bucketed_position_ids(grid_h, grid_w, self.grid_size, weight.device)]
        if grid_h == self.grid_size and grid_w == self.grid_size:
            return weight
        prefix, patches = weight[: self.num_prefix_tokens], weight[self.num_prefix_tokens :]
        dim = weight.shape[-1]
        grid = patches.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        # Same resize as transformers' interpolate_pos_encoding (SigLIP/CLIP/InternVL), done in float32
        # because bicubic in bf16 loses the small differences between neighbouring positions.
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.to(weight.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, dim)
        return torch.cat([prefix, grid], dim=0)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_mask` [N, h, w] (True: a patch of the image; see `VisionEncoder.forward`)."""
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise InputError(
                f"image size {height}x{width} is not a multiple of the vision patch size {self.patch_size}"
            )
        x = pixel_values.to(self.patch_embedding.weight.dtype)
        if self.conv_stem is not None:
            x = self.conv_stem(x)
        x = self.patch_embedding(x)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        if patch_mask is not None:
            return x + self.masked_position_embeddings(patch_mask)
        return x + self.position_embeddings(grid_h, grid_w)

    def masked_position_embeddings(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """[N, h·w, D]: each image's own grid (its top-left rectangle of True patches) gets the positions of
        a grid of that size; padding patches get position 0, as Idefics2's NaViT-style embeddings give them."""
        if self.num_prefix_tokens:
            raise InputError("a patch mask needs a vision tower without a CLS token")
        n, grid_h, grid_w = patch_mask.shape
        weight = self.position_embedding.weight
        out = weight[0].expand(n, grid_h, grid_w, -1).clone()
        for i in range(n):
            rows, cols = int(patch_mask[i, :, 0].sum()), int(patch_mask[i, 0, :].sum())
            rectangle = bool(patch_mask[i, :rows, :cols].all()) and int(patch_mask[i].sum()) == rows * cols
            if rows == 0 or cols == 0 or not rectangle:
                raise InputError("each image's patch mask must be one top-left rectangle of at least one patch")
            out[i, :rows, :cols] = self.position_embeddings(rows, cols).reshape(rows, cols, -1)
        return out.reshape(n, grid_h * grid_w, -1)


def bucketed_position_ids(grid_h: int, grid_w: int, side: int, device: torch.device | None = None) -> torch.Tensor:
    """Idefics3's position ids for a grid_h × grid_w patch grid over a side × side trained grid: each
    patch's fractional coordinate, in float32 as transformers computes it, bucketed by the boundaries
    1/side, 2/side, ... (so the few patches whose coordinate rounds below a boundary take its lower
    bucket, as in the checkpoints' training)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)

    def buckets(n: int) -> torch.Tensor:
        step = 1.0 / torch.tensor([n], device=device)  # a float32 tensor, as transformers' 1.0 / count
        coords = (torch.arange(n, device=device, dtype=torch.float32) * step).clamp(max=1.0 - 1e-6)
        return torch.bucketize(coords, boundaries, right=True)

    return (buckets(grid_h)[:, None] * side + buckets(grid_w)[None, :]).reshape(-1)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with optional InternViT QK-norm (over the full width)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        # InternViT normalises q and k before splitting into heads, so the norm spans all heads.
        # (transformers' InternVL port fixes this eps at 1e-6; released InternViT configs use 1e-6 too.)
        self.q_norm: nn.Module = RMSNorm(d, eps=config.layer_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(d, eps=config.layer_norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [N, length] (True: attend to that token; None: to every one)."""
        n, length, d = x.shape
        q = self.q_norm(self.q_proj(x)).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """x + ls1·attn(norm1(x)), then + ls2·mlp(norm2(x)); ls1/ls2 only when layer scale is on."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = _block_norm(config)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = _block_norm(config)
        self.mlp = VisionMLP(config)
        if config.layer_scale_init is not None:
            self.ls1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init)))
            self.ls2 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init)))
        else:
            self.register_parameter("ls1", None)
            self.register_parameter("ls2", None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self_attn(self.layer_norm1(x), mask)
        x = x + (h if self.ls1 is None else self.ls1 * h)
        h = self.mlp(self.layer_norm2(x))
        return x + (h if self.ls2 is None else self.ls2 * h)


class VisionTransformer(nn.Module):
    """The stack of blocks; a module of its own only so parameter names read `encoder.layers.N`."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, num_layers: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the first `num_layers` blocks (all when None); `mask` as VisionAttention's."""
        for layer in self.layers[:num_layers]:
            x = layer(x, mask)
        return x


class VisionEncoder(nn.Module):
    """Image tiles [N, 3, H, W] → last hidden state [N, num_prefix_tokens + (H/p)·(W/p), hidden].

    H and W may differ from `config.image_size` (any multiple of the patch size): the position
    embeddings are then resized bicubically. The CLS token, when the config has one, is the first
    token; `num_prefix_tokens` says how many to drop before pixel shuffle.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        # The outer norms are LayerNorm in every family we import (even InternViT-6B, whose blocks use
        # RMSNorm), so norm_type only governs the blocks.
        d, eps = config.hidden_size, config.layer_norm_eps
        self.pre_layernorm = nn.LayerNorm(d, eps=eps) if config.pre_layernorm else None
        self.encoder = VisionTransformer(config)
        self.post_layernorm = nn.LayerNorm(d, eps=eps) if config.post_layernorm else None
        self.reset_parameters()

    @property
    def num_prefix_tokens(self) -> int:
        return self.embeddings.num_prefix_tokens

    def reset_parameters(self) -> None:
        """ViT-style initialisation for training from scratch (truncated normal 0.02, zero biases)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.embeddings.conv_stem is not None:
            # Convolutions followed by BatchNorm keep PyTorch's fan-in initialisation, as ResNets do.
            for module in self.embeddings.conv_stem.modules():
                if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                    module.reset_parameters()
        if self.embeddings.class_embedding is not None:
            nn.init.trunc_normal_(self.embeddings.class_embedding, std=0.02)
        if self.config.layer_scale_init is not None:
            for layer in self.encoder.layers:
                nn.init.constant_(layer.ls1, self.config.layer_scale_init)
                nn.init.constant_(layer.ls2, self.config.layer_scale_init)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_mask` [N, H/p, W/p] bool (None: all True): which patches are image, not padding, when images
        of different sizes share one padded tensor (Idefics2). Each image's True patches are a top-left
        rectangle; they get that grid's position embeddings, and no token attends to a padding patch.
        (The padding tokens' own outputs are computed but mean nothing.)"""
        x = self.embeddings(pixel_values, patch_mask)
        mask = None if patch_mask is None else patch_mask.reshape(patch_mask.shape[0], -1)
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        if self.config.feature_layers:  # several hidden states, concatenated along the channels
            if mask is not None:
                raise InputError("a patch mask is not supported with vision.feature_layers")
            return self._hidden_states(x, self.config.feature_layers)
        layer = self.config.feature_layer
        if layer != -1:  # an earlier hidden state (config.feature_layer), read before the final norm
            return self.encoder(x, layer % (self.config.num_hidden_layers + 1), mask)
        x = self.encoder(x, mask=mask)
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        return x

    def _hidden_states(self, x: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
        """transformers' hidden_states[k] for each k in `layers` (0 the embeddings, k after block k),
        concatenated in that order; the blocks past the deepest one asked for are not run."""
        total = self.config.num_hidden_layers + 1
        wanted = [k % total for k in layers]
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)], start=1):
            x = layer(x)
            states[i] = x
        return torch.cat([states[k] for k in wanted], dim=-1)
