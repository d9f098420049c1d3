"""The composed omni model: vision and audio towers, their projectors, and the decoder.

Every modality enters the decoder the same way: text is embedded, each media item is encoded once,
projected to the decoder width, and written into the positions of its placeholder tokens
(`<IMG_CONTEXT>` / `<AUDIO_CONTEXT>`). Names follow LLaVA/InternVL in transformers
(`vision_tower`, `multi_modal_projector`, `language_model`) so weights travel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tinyomni.config import OmniConfig
from tinyomni.errors import InputError
from tinyomni.model.aria_projector import AriaProjector, aria_padding
from tinyomni.model.audio import AudioEncoder
from tinyomni.model.decoder import CacheState, Decoder
from tinyomni.model.media_cache import MediaCache, weights_state
from tinyomni.model.moe import MoEDecoder
from tinyomni.model.opt import OPTDecoder
from tinyomni.model.phi import PhiDecoder
from tinyomni.model.projector import LinearProjector, MultiModalProjector, pixel_shuffle
from tinyomni.model.qformer import QFormerConnector
from tinyomni.model.resampler import ResamplerConnector, split_padding
from tinyomni.model.vision import VisionEncoder

if TYPE_CHECKING:
    from tinyomni.processing.llava_next import Layout


class OmniModel(nn.Module):
    def __init__(self, config: OmniConfig) -> None:
        super().__init__()
        self.config = config
        dec = config.decoder
        self.language_model = {"opt": OPTDecoder, "phi": PhiDecoder, "moe": MoEDecoder}.get(dec.kind, Decoder)(dec)
        if dec.visual_expert:  # CogVLM's deep fusion: image tokens get their own weights in every layer
            from tinyomni.model.visual_expert import VisualExpertDecoder

            self.language_model = VisualExpertDecoder(dec)
        self.vision_tower: VisionEncoder | None = None
        self.multi_modal_projector: MultiModalProjector | LinearProjector | ResamplerConnector | None = None
        self.audio_tower: AudioEncoder | None = None
        self.audio_projector: MultiModalProjector | LinearProjector | None = None
        if config.vision is not None:
            r = config.vision_projector.downsample_ratio
            self.vision_tower = VisionEncoder(config.vision)
            width = config.vision.hidden_size * config.vision.num_feature_layers  # layers concatenated
            in_features = round(width / (r * r))  # round: r = 1/3 is not exact in binary
            if config.vision_projector.kind == "qformer":
                self.multi_modal_projector = QFormerConnector(config.vision_projector.qformer, in_features,
                                                              dec.hidden_size)
            elif config.vision_projector.kind == "resampler":
                self.multi_modal_projector = ResamplerConnector(in_features, dec.hidden_size, config.vision_projector)
            elif config.vision_projector.kind == "aria":
                p = config.vision_projector
                self.multi_modal_projector = AriaProjector(in_features, config.vision.num_attention_heads,
                                                           dec.hidden_size, p.aria_num_queries, p.aria_query_rows,
                                                           p.hidden_size)
            elif config.vision_projector.kind == "linear":
                self.multi_modal_projector = LinearProjector(in_features, dec.hidden_size)
            elif config.image_resize == "anyres":  # LLaVA-NeXT: the MLP, plus image_newline and its packing
                from tinyomni.model.anyres import AnyresProjector

                self.multi_modal_projector = AnyresProjector(
                    in_features, dec.hidden_size, config.vision_projector.hidden_size,
                    hidden_act=config.vision_projector.hidden_act, layer_norm=config.vision_projector.layer_norm)
            else:
                self.multi_modal_projector = MultiModalProjector(
                    in_features, dec.hidden_size, config.vision_projector.hidden_size,
                    hidden_act=config.vision_projector.hidden_act, layer_norm=config.vision_projector.layer_norm)
        if config.audio is not None:
            self.audio_tower = AudioEncoder(config.audio)
            if config.audio_projector.kind == "linear":  # Qwen2-Audio: one Linear
                self.audio_projector = LinearProjector(config.audio.d_model, dec.hidden_size,
                                                       bias=config.audio_projector.linear_bias)
            else:
                self.audio_projector = MultiModalProjector(
                    config.audio.d_model, dec.hidden_size, config.audio_projector.hidden_size,
                    hidden_act=config.audio_projector.hidden_act)
        # Set from the tokenizer when a model is loaded (see api.Model); -1 matches no token.
        self.image_token_id = -1
        self.audio_token_id = -1
        # Encoded media by content (model/media_cache.py), for inference: api.Model sets one; None here,
        # so a bare model (training, parity tests) always runs its encoders.
        self.media_cache: MediaCache | None = None

    # --- encoders ----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor, qformer_input_ids: list[Tensor] | None = None,
                      image_layouts: list[Layout] | None = None) -> Tensor:
        """[tiles, 3, S, S] → [tiles, tokens_per_tile, decoder_hidden]. An instruction-aware Q-Former also
        reads each tile's instruction ids (`qformer_input_ids`, one per tile); LLaVA-NeXT needs each image's
        grid layout (`image_layouts`, one per image) and returns its packed features [tokens, decoder_hidden].
        With a media cache (and no autograd) tiles encoded before are taken from it."""
        cache = self.media_cache
        if cache is None or torch.is_grad_enabled():
            return self._encode_images(pixel_values, qformer_input_ids, image_layouts)
        state = weights_state((self.vision_tower, self.multi_modal_projector))
        n = pixel_values.shape[0]
        joint = self.config.image_resize == "anyres" or self.config.vision_projector.kind in ("aria", "resampler")
        per_tile = not joint and not image_layouts and (qformer_input_ids is None or len(qformer_input_ids) == n)
        if not per_tile:  # tiles are encoded together (padding, packing): the whole call is the unit
            key = cache.key("images", state, pixel_values, repr(image_layouts), *(qformer_input_ids or ()))
            out = cache.get(key)
            if out is None:
                out = self._encode_images(pixel_values, qformer_input_ids, image_layouts)
                cache.put(key, out)
            return out
        ids = qformer_input_ids or [None] * n
        keys = [cache.key("tile", state, pixel_values[i], ids[i]) for i in range(n)]
        outs = [cache.get(key) for key in keys]
        missing = [i for i, out in enumerate(outs) if out is None]
        if missing:
            every = len(missing) == n
            fresh = self._encode_images(pixel_values if every else pixel_values[missing],
                                        [ids[i] for i in missing] if qformer_input_ids is not None else None)
            for i, out in zip(missing, fresh):
                outs[i] = out
                cache.put(keys[i], out)
        return torch.stack(outs)

    def encode_audio(self, features: Tensor) -> Tensor:
        """One clip's log-mel [n_mels, frames] → [tokens, decoder_hidden] (from the media cache when seen)."""
        cache = self.media_cache
        if cache is None or torch.is_grad_enabled():
            return self._encode_audio(features)
        key = cache.key("audio", weights_state((self.audio_tower, self.audio_projector)), features)
        out = cache.get(key)
        if out is None:
            out = self._encode_audio(features)
            cache.put(key, out)
        return out

    def _encode_images(self, pixel_values: Tensor, qformer_input_ids: list[Tensor] | None = None,
                       image_layouts: list[Layout] | None = None) -> Tensor:
        if self.vision_tower is None:
            raise InputError("this model has no vision encoder")
        weight = self.vision_tower.embeddings.patch_embedding.weight
        layouts = None
        if self.config.image_resize == "anyres":  # LLaVA-NeXT: the grids travel beside the pixels
            from tinyomni.model.anyres import check_layouts

            layouts = check_layouts(pixel_values, image_layouts)
        elif image_layouts:
            raise InputError("this model takes no image layouts (image_layouts): only LLaVA-NeXT "
                             "(image_resize 'anyres') lays its images out on a grid")
        patch_mask = None
        if self.config.vision_projector.kind == "aria":  # Aria: one tile per image, padded (NaN) bottom-right
            vision = self.config.vision
            pixel_values, patch_mask = aria_padding(pixel_values, vision.patch_size, vision.image_mean,
                                                    vision.image_std)
            features = self.vision_tower(pixel_values.to(weight.dtype), patch_mask)
            return self.multi_modal_projector(features, None if patch_mask is None else patch_mask.flatten(1))
        if self.config.vision_projector.kind == "resampler":  # tiles of several sizes, padded (NaN) to one
            pixel_values, patch_mask = split_padding(pixel_values, self.config.vision.patch_size)
        features = self.vision_tower(pixel_values.to(weight.dtype), patch_mask)
        if patch_mask is not None:
            return self.multi_modal_projector(features, patch_mask.reshape(patch_mask.shape[0], -1))
        select = self.config.vision.feature_select
        if (select == "patches" and self.config.vision.use_cls_token) or select == "drop_first":
            features = features[:, 1:]
        ratio = self.config.vision_projector.downsample_ratio
        if ratio != 1:  # pixel shuffle needs the square patch grid (config.validate keeps it so)
            n, p, c = features.shape
            side = int(p**0.5)
            features = pixel_shuffle(features.reshape(n, side, side, c), ratio)
            features = features.reshape(n, -1, features.shape[-1])
        if self.config.vision_projector.kind == "qformer":
            return self.multi_modal_projector(features, qformer_input_ids)
        if layouts is not None:  # each image's grid unpadded, its rows ended by image_newline
            return self.multi_modal_projector.pack(self.multi_modal_projector(features), layouts)
        return self.multi_modal_projector(features)

    def _encode_audio(self, features: Tensor) -> Tensor:
        if self.audio_tower is None:
            raise InputError("this model has no audio encoder")
        weight = self.audio_tower.conv1.weight
        return self.audio_projector(self.audio_tower(features[None].to(weight.dtype)))[0]

    # --- embeddings --------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None,
              audio_features: list[Tensor] | None = None, qformer_input_ids: list[Tensor] | None = None,
              image_layouts: list[Layout] | None = None) -> Tensor:
        """Token embeddings with every media item's embeddings written into its placeholders.

        The placeholders of all rows are filled in order: images (all tiles of all rows, row-major),
        then audio clips. A count mismatch is an error, never a silent truncation.
        """
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None and image_layouts:
            raise InputError("image_layouts without pixel values")
        images = None
        if pixel_values is not None:
            images = self.encode_images(pixel_values, qformer_input_ids, image_layouts)
        embeds = self._scatter(embeds, input_ids, self.image_token_id, "image", images)
        audio = None
        if audio_features:
            audio = torch.cat([self.encode_audio(f) for f in audio_features])
        return self._scatter(embeds, input_ids, self.audio_token_id, "audio", audio)

    @staticmethod
    def _scatter(embeds: Tensor, input_ids: Tensor, token_id: int, kind: str, media: Tensor | None) -> Tensor:
        positions = input_ids == token_id
        n_slots = int(positions.sum())
        media = None if media is None else media.reshape(-1, embeds.shape[-1])
        n_media = 0 if media is None else media.shape[0]
        if n_slots != n_media:
            raise InputError(f"the prompt has {n_slots} {kind} placeholder tokens but the {kind} inputs give "
                             f"{n_media} embeddings; build prompts with ChatProcessor so the counts match")
        if n_media == 0:
            return embeds
        embeds = embeds.clone()
        embeds[positions] = media.to(embeds.dtype)
        return embeds

    # --- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        audio_features: list[Tensor] | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        cache: CacheState | None = None,
        logits_to_keep: int = 0,
        qformer_input_ids: list[Tensor] | None = None,
        image_layouts: list[Layout] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(logits, loss): the loss is next-token cross-entropy over labels != -100. `qformer_input_ids`:
        each image's instruction in the Q-Former's vocabulary (instruction-aware Q-Formers only);
        `image_layouts`: each image's tile grid (LLaVA-NeXT only; `Prompt.image_layouts`)."""
        embeds = self.embed(input_ids, pixel_values, audio_features, qformer_input_ids, image_layouts)
        return self.language_model(inputs_embeds=embeds, position_ids=position_ids,
                                   attention_mask=attention_mask, cache=cache, labels=labels,
                                   logits_to_keep=logits_to_keep, **self.decoder_inputs(input_ids))

    def decoder_inputs(self, input_ids: Tensor) -> dict[str, Tensor]:
        """What the decoder takes beyond embeddings: a visual-expert decoder, where the image tokens are."""
        if self.config.decoder.visual_expert:
            return {"image_mask": input_ids == self.image_token_id}
        return {}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (tied weights counted once)."""
        parts = {"vision_tower": self.vision_tower, "multi_modal_projector": self.multi_modal_projector,
                 "audio_tower": self.audio_tower, "audio_projector": self.audio_projector,
                 "language_model": self.language_model}
        return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()
                if module is not None}
