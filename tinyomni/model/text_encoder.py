"""Text towers of dual encoders: token ids → one vector per text.

Two kinds:
- `TextTower`: the small encoder that contrastive pretraining trains beside an omni model's vision or
  audio tower (tinyomni/train/contrastive.py): token embedding + learned positions + pre-norm
  `nn.TransformerEncoder` layers + masked mean pooling.
- `TextTransformer`: CLIP's and SigLIP's text model, with transformers' parameter names
  (`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`, `final_layer_norm`, SigLIP's
  `head`), so importing one is a rename (tinyomni/checkpoints/clip.py). Its blocks are the vision
  tower's (`VisionEncoderLayer`: the same names and maths) with a mask on the attention: CLIP's is
  causal and pools the first end-of-text token, SigLIP's is bidirectional and pools the last position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import VisionConfig
from tinyomni.model.vision import VisionAttention, VisionEncoderLayer


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` [B, T, D] over the positions where `mask` [B, T] is true."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class TextTower(nn.Module):
    """Token embedding + a few pre-norm transformer layers + masked mean pooling.

    `spec` is a `tinyomni.train.recipe.TextTowerSpec` (hidden_size, layers, heads, max_length); any
    object with those attributes will do.
    """

    def __init__(self, vocab_size: int, spec: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, spec.hidden_size)
        self.positions = nn.Parameter(torch.randn(spec.max_length, spec.hidden_size) * 0.02)
        layer = nn.TransformerEncoderLayer(spec.hidden_size, spec.heads, 4 * spec.hidden_size, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.hidden_size)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids) + self.positions[: ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        return masked_mean(x, mask)


# --- CLIP / SigLIP -----------------------------------------------------------------------------------
@dataclass
class TextEncoderConfig:
    """A CLIP or SigLIP text model. `causal` and `pooling` are what differ between the two families."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    causal: bool  # CLIP: each token sees only those before it
    pooling: str  # "eos": the first end-of-text token (CLIP) · "last": the last position (SigLIP)
    eos_token_id: int | None = None
    legacy_eos: bool = False  # CLIP configs with eos_token_id 2 pool the highest id instead (transformers' rule)
    head_size: int | None = None  # SigLIP's `head` (a Linear with bias) after pooling; None: no head

    def block_config(self) -> VisionConfig:
        """The shapes of one block, as the vision tower's blocks read them."""
        return VisionConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                            num_attention_heads=self.num_attention_heads, hidden_act=self.hidden_act,
                            layer_norm_eps=self.layer_norm_eps, qkv_bias=True, num_hidden_layers=1)


class TextAttention(VisionAttention):
    """The vision tower's attention with a boolean mask [B, 1, T, T] (True: may attend)."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        n, length, d = x.shape
        q = self.q_proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d))


class TextEncoderLayer(VisionEncoderLayer):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        self.self_attn = TextAttention(config)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class TextLayers(nn.Module):
    """The stack of blocks; a module of its own only so parameter names read `encoder.layers.N`."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        block = config.block_config()
        self.layers = nn.ModuleList(TextEncoderLayer(block) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TextTransformer(nn.Module):
    """input_ids [B, T] (+ attention_mask [B, T], 1 for real tokens) → pooled text features [B, D]
    (after SigLIP's head when the config has one; CLIP's `text_projection` belongs to the pair)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextLayers(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.head_size) if config.head_size else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"{length} tokens is more than the text model's {self.config.max_position_embeddings}")
        x = self.embeddings(input_ids)
        keys = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        mask = keys
        if self.config.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            mask = causal if keys is None else keys & causal
        x = self.final_layer_norm(self.encoder(x, mask))
        rows = torch.arange(x.shape[0], device=x.device)
        if self.config.pooling == "last":
            pooled = x[:, -1]
        elif self.config.legacy_eos or self.config.eos_token_id is None:
            pooled = x[rows, input_ids.argmax(-1)]
        else:  # the first end-of-text token (padding may use the same id after it)
            pooled = x[rows, (input_ids == self.config.eos_token_id).int().argmax(-1)]
        return self.head(pooled) if self.head is not None else pooled
