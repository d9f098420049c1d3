"""Dual encoders: a media tower and a text tower whose outputs share one embedding space.

- `ImageTextModel`: CLIP (`CLIPModel`) and SigLIP (`SiglipModel`): the vision tower (VisionEncoder),
  its pooling (CLIP: the CLS token through `post_layernorm` and `visual_projection`; SigLIP: the
  attention-pooling `head`), the text model (TextTransformer; CLIP adds `text_projection`), and the
  logit scale (and SigLIP's bias). Imported by tinyomni/checkpoints/clip.py.
- `ContrastivePair`: what contrastive pretraining trains beside an omni model's vision or audio tower
  (tinyomni/train/contrastive.py), with the training module's parameter names (`encoder`,
  `text_tower`, `media_head`, `text_head`, `logit_scale`, `logit_bias`), so a training checkpoint's
  `stage_module.*` tensors load as they are.

Both give L2-normalised float32 embeddings; `logits(media, text)` is transformers' logits_per_image:
cosine × exp(logit_scale) (+ logit_bias for SigLIP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import AudioConfig, VisionConfig
from tinyomni.model.audio import audio_output_length
from tinyomni.model.text_encoder import TextEncoderConfig, TextTower, TextTransformer, masked_mean
from tinyomni.model.vision import VisionEncoder, VisionMLP


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


# --- CLIP / SigLIP -------------------------------------------------------------------------------------
@dataclass
class ImageTextConfig:
    family: str  # "clip" | "siglip"
    vision: VisionConfig
    text: TextEncoderConfig
    projection_dim: int | None = None  # CLIP's shared width (visual_projection / text_projection)


class AttentionPooling(nn.Module):
    """SigLIP's `head`: one learned query attends over the patches, then a residual MLP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class ClipPooling(nn.Module):
    """CLIP's image side after the tower: the CLS token, its `post_layernorm`, `visual_projection`."""

    def __init__(self, config: VisionConfig, projection_dim: int) -> None:
        super().__init__()
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(config.hidden_size, projection_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.visual_projection(self.post_layernorm(x[:, 0]))


class ImageTextModel(nn.Module):
    def __init__(self, config: ImageTextConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionEncoder(config.vision)
        self.text_model = TextTransformer(config.text)
        if config.family == "clip":
            if config.projection_dim is None:
                raise ValueError("a CLIP model needs projection_dim")
            self.vision_pool: nn.Module = ClipPooling(config.vision, config.projection_dim)
            self.text_projection: nn.Linear | None = nn.Linear(config.text.hidden_size, config.projection_dim,
                                                               bias=False)
            self.logit_bias: nn.Parameter | None = None
        else:
            self.vision_pool = AttentionPooling(config.vision)
            self.text_projection = None
            self.logit_bias = nn.Parameter(torch.zeros(()))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        return normalize(self.vision_pool(self.vision_model(pixel_values)))

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.text_model(input_ids, attention_mask)
        return normalize(self.text_projection(x) if self.text_projection is not None else x)

    def logits(self, media: Tensor, text: Tensor) -> Tensor:
        """[media, text] similarities as transformers' logits_per_image."""
        out = media @ text.T * self.logit_scale.float().exp()
        return out + self.logit_bias.float() if self.logit_bias is not None else out


# --- the towers of contrastive pretraining ---------------------------------------------------------------
def media_features(encoder: nn.Module, kind: str, media: Tensor, media_mask: Tensor | None,
                   audio_config: AudioConfig | None) -> tuple[Tensor, Tensor | None]:
    """The encoder's output [B, T, D] and, for audio, which positions hold real frames [B, T]."""
    if kind == "vision":
        return encoder(media), None  # every patch (a CLS token, if any, is one more)
    features = encoder(media, attention_mask=media_mask)
    frames = media_mask.sum(1).tolist()
    lengths = torch.tensor([audio_output_length(int(f), audio_config) for f in frames])
    valid = (torch.arange(features.shape[1])[None, :] < lengths[:, None]).to(features.device)
    return features, valid


@dataclass
class PairConfig:
    """One contrastive pair: which tower, its text tower's shape and the loss it was trained with."""

    kind: str  # "vision" | "audio"
    vocab_size: int
    text_tower: Any  # a TextTowerSpec (hidden_size, layers, heads, max_length, embed_dim)
    loss: str  # "siglip" | "clip"
    encoder_width: int
    image_size: int | None = None  # the tile side its images were made at (vision)


class ContrastivePair(nn.Module):
    """An encoder (vision or audio tower) + text tower + the two heads + temperature (and bias)."""

    def __init__(self, config: PairConfig, encoder: nn.Module, audio_config: AudioConfig | None = None) -> None:
        super().__init__()
        self.config, self.audio_config = config, audio_config
        spec = config.text_tower
        self.encoder = encoder
        self.text_tower = TextTower(config.vocab_size, spec)
        self.media_head = nn.Linear(config.encoder_width, spec.embed_dim)
        self.text_head = nn.Linear(spec.hidden_size, spec.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if config.loss == "siglip" else None

    def embed_media(self, media: Tensor, media_mask: Tensor | None = None) -> Tensor:
        features, valid = media_features(self.encoder, self.config.kind, media, media_mask, self.audio_config)
        pooled = features.mean(1) if valid is None else masked_mean(features, valid)
        return normalize(self.media_head(pooled))

    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return normalize(self.text_head(self.text_tower(ids, mask)))

    def logits(self, media: Tensor, text: Tensor) -> Tensor:
        out = media @ text.T * self.logit_scale.float().exp()
        return out + self.logit_bias.float() if self.logit_bias is not None else out
