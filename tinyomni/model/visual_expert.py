"""The visual expert: CogVLM's deep fusion, as an option of the Llama-family decoder
(`decoder.visual_expert = true`).

Every layer holds, beside its own attention projections and MLP, a second set of each (the "visual
expert") that image tokens use; text tokens use the usual ones. Attention itself is one: image and text
positions attend over one sequence and one KV cache, and the keys and values cached for image positions
are the expert's (computed once, at prefill). The norms are shared, as in CogVLM.

Which positions are image tokens is an `image_mask` [B, T] (True at image placeholders), that
`OmniModel.decoder_inputs` derives from the input ids, in prefill, decode and training alike. Generated
tokens are text, so a decode step runs exactly the plain layer. A forward from embeddings without a mask
is refused: it cannot know where the images are, and guessing "none" would be a silent wrong result.

Names: the text side keeps the plain decoder's (`model.layers.N.self_attn.q_proj`, `...mlp.gate_proj`), so
a plain decoder's weights load into it unchanged; the expert's sit beside them under
`model.layers.N.visual_expert.` (`self_attn.q_proj` … `mlp.down_proj`). `copy_text_to_expert` starts the
expert from the text weights: the model then computes exactly what the plain decoder does, which is where
training from a plain decoder begins.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from tinyomni.config import DecoderConfig
from tinyomni.errors import ConfigError, InputError
from tinyomni.model.decoder import MLP, CacheState, Decoder, DecoderLayer, DecoderModel, RMSNorm, RotaryEmbedding


class ExpertProjections(nn.Module):
    """The expert's q/k/v/o projections, shaped and named as `Attention`'s (attention is the layer's own)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        width, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        dim, bias = config.attn_head_dim, config.attention_bias
        self.q_proj = nn.Linear(width, heads * dim, bias=bias)
        self.k_proj = nn.Linear(width, kv * dim, bias=bias)
        self.v_proj = nn.Linear(width, kv * dim, bias=bias)
        self.o_proj = nn.Linear(heads * dim, width, bias=False)


class VisualExpert(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = ExpertProjections(config)
        self.mlp = MLP(config)


class VisualExpertLayer(DecoderLayer):
    """A Llama layer whose image positions go through `visual_expert`'s projections and MLP."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.visual_expert = VisualExpert(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: CacheState | None,
                image_mask: Tensor | None = None) -> Tensor:
        if image_mask is None:  # no image token in this forward: the plain layer
            return super().forward(x, cos, sin, mask, cache)
        attn, expert = self.self_attn, self.visual_expert.self_attn
        where = image_mask[..., None]

        def mix(text: nn.Module, visual: nn.Module, h: Tensor) -> Tensor:
            # Both on every position, then chosen: the text positions' values are bit for bit the plain
            # layer's, and so are the image positions' while the expert holds a copy of the text weights.
            return torch.where(where, visual(h), text(h))

        h = self.input_layernorm(x)
        y = attn.attend(mix(attn.q_proj, expert.q_proj, h), mix(attn.k_proj, expert.k_proj, h),
                        mix(attn.v_proj, expert.v_proj, h), cos, sin, mask, cache)
        x = x + mix(attn.o_proj, expert.o_proj, y)
        return x + mix(self.mlp, self.visual_expert.mlp, self.post_attention_layernorm(x))


class VisualExpertModel(DecoderModel):
    def __init__(self, config: DecoderConfig) -> None:
        nn.Module.__init__(self)  # DecoderModel's layers would be built only to be replaced
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(VisualExpertLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class VisualExpertDecoder(Decoder):
    """`Decoder` with visual-expert layers. Every forward says where the image tokens are (`image_mask`);
    from token ids alone (a decode step) there are none."""

    body = VisualExpertModel

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: CacheState | None = None, labels: Tensor | None = None, logits_to_keep: int = 0,
                image_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if image_mask is None:
            if input_ids is None:
                raise InputError("the visual-expert decoder needs image_mask with inputs_embeds (which "
                                 "positions are image tokens); OmniModel.decoder_inputs gives it")
            image_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # token ids alone: text only
        return super().forward(input_ids, inputs_embeds, position_ids, attention_mask, cache, labels,
                               logits_to_keep, image_mask=image_mask)

    def hidden_states(self, x: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                      cache: CacheState | None = None, image_mask: Tensor | None = None) -> Tensor:
        if image_mask is None:
            raise InputError("the visual-expert decoder needs image_mask (which positions are image tokens); "
                             "OmniModel.decoder_inputs gives it")
        if image_mask.shape != x.shape[:2]:
            raise InputError(f"image_mask is {list(image_mask.shape)} for {list(x.shape[:2])} positions")
        # Without image tokens every layer is the plain one (and an engine's fused decode step may run).
        inputs = {"image_mask": image_mask.to(x.device)} if bool(image_mask.any()) else {}
        return super().hidden_states(x, position_ids, attention_mask, cache, **inputs)


def add_visual_expert(omni: nn.Module) -> None:
    """Turn an omni model's plain Llama decoder into a visual-expert one, in place, the expert started
    from the text weights: the model computes exactly what it did until the expert is trained."""
    config, plain = omni.config.decoder, omni.language_model
    if config.visual_expert:
        raise ConfigError("the decoder already has a visual expert")
    if type(plain) is not Decoder:
        raise ConfigError(f"a visual expert needs a plain Llama-family decoder, not decoder.kind {config.kind!r}")
    config = dataclasses.replace(config, visual_expert=True)
    weight = plain.model.embed_tokens.weight
    decoder = VisualExpertDecoder(config).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = decoder.load_state_dict(plain.state_dict(), strict=False)
    if unexpected or not all(is_expert_weight(k) for k in missing):
        raise ConfigError(f"the decoder's weights do not fit a visual-expert decoder: {unexpected or missing}")
    copy_text_to_expert(decoder)
    omni.language_model = decoder
    omni.config.decoder = config


def copy_text_to_expert(decoder: VisualExpertDecoder) -> None:
    """Every layer's expert := a copy of its text projections and MLP (the start of training)."""
    with torch.no_grad():
        for layer in decoder.model.layers:
            attn, expert = layer.self_attn, layer.visual_expert
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(expert.self_attn, name).load_state_dict(getattr(attn, name).state_dict())
            expert.mlp.load_state_dict(layer.mlp.state_dict())


def is_expert_weight(name: str) -> bool:
    """A visual-expert tensor's name (in a decoder's or the omni model's state dict)."""
    return ".visual_expert." in name
