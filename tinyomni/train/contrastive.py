"""Contrastive pretraining of an encoder against a small text tower (CLIP / SigLIP).

A ViT learns from scratch far more cheaply this way than through the LLM: each image is pulled
towards the embedding of its caption and away from the other captions of the batch. The same works
for the audio encoder with spoken words and their transcripts. Only the encoder is kept afterwards;
the text tower and the two projection heads are thrown away by the model it trains, but can be kept
as a dual encoder for retrieval (tinyomni/retrieval reads them from the stage's training checkpoint,
where they are saved as `stage_module.*`). The text tower itself is `tinyomni.model.text_encoder.TextTower`.

Captions in a synthetic world repeat ("red", "3"), so two samples with the same text are both
positives for each other rather than false negatives.

With `tag_loss`, a second head on the encoder's pooled features (mean and max over positions)
predicts which words of the tag vocabulary (the tokens of the data's descriptions) the sample's
own text contains (CatLIP-style multi-label classification), so every word is a direct target; it
is thrown away with the text tower. Only descriptive texts (captions, rendered words, transcripts)
are targets: a question with its answer names one object, which may be absent, and leaves out the
others.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.model.dual_encoder import media_features
from tinyomni.model.text_encoder import TextTower, masked_mean
from tinyomni.train.data import PairBatch
from tinyomni.train.recipe import TextTowerSpec


class ContrastiveModule(nn.Module):
    """An encoder of the omni model (vision or audio tower) + the text tower + heads + the loss."""

    def __init__(self, encoder: nn.Module, encoder_width: int, kind: str, vocab_size: int, spec: TextTowerSpec,
                 loss: str, audio_config=None, tag_loss: float = 0.0, tag_vocabulary: list[int] | None = None) -> None:
        super().__init__()
        self.encoder = encoder  # shared with the omni model: what this stage trains
        self.kind, self.loss_kind, self.audio_config = kind, loss, audio_config
        self.tag_weight = tag_loss
        if tag_loss:
            if not tag_vocabulary:
                raise ValueError("tag_loss needs the token ids it predicts (tag_vocabulary)")
            # One output per word of the descriptions, not per token of the vocabulary: a zero-initialised
            # head over all 49k tokens learnt colours but not shapes in 600 steps, where this one, like
            # direct labels, learns both (measured: docs/training.md).
            self.tag_head = nn.Linear(2 * encoder_width, len(tag_vocabulary))
            self.register_buffer("tag_ids", torch.tensor(tag_vocabulary), persistent=False)
        self.text_tower = TextTower(vocab_size, spec)
        self.media_head = nn.Linear(encoder_width, spec.embed_dim)
        self.text_head = nn.Linear(spec.hidden_size, spec.embed_dim)
        if loss == "siglip":  # SigLIP's initialisation: temperature 10, bias -10
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        else:  # CLIP's: temperature 1/0.07
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.logit_bias = None

    def pool_media(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        """The encoder's output averaged and max-pooled over its positions (patches or frames)."""
        # The same features retrieval embeds (model/dual_encoder.py), so the two cannot drift apart.
        features, mask = media_features(self.encoder, self.kind, batch.media, batch.media_mask, self.audio_config)
        if mask is None:
            return features.mean(1), features.amax(1)
        return masked_mean(features, mask), features.masked_fill(~mask[..., None], float("-inf")).amax(1)

    def embed_media(self, pooled_mean: Tensor) -> Tensor:
        return F.normalize(self.media_head(pooled_mean).float(), dim=-1)

    def tag_loss(self, pooled: tuple[Tensor, Tensor], batch: PairBatch) -> Tensor:
        """Binary cross-entropy of "this word is in my text" over the tag vocabulary, summed over it,
        per sample (samples whose text is not a description count as zero)."""
        n = pooled[0].shape[0]
        logits = self.tag_head(torch.cat(pooled, -1)).float()
        ids, mask = batch.text_ids[:n], batch.text_mask[:n]
        present = torch.zeros(n, int(max(ids.max(), self.tag_ids.max())) + 1, device=logits.device)
        rows = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
        present[rows[mask], ids[mask]] = 1.0  # padding may share an id with a real token: never a target
        per_sample = F.binary_cross_entropy_with_logits(logits, present[:, self.tag_ids], reduction="none").sum(-1)
        if batch.describes is not None:
            per_sample = per_sample * batch.describes.to(per_sample.device)
        return per_sample.sum() / n

    def embed_text(self, batch: PairBatch) -> Tensor:
        return F.normalize(self.text_head(self.text_tower(batch.text_ids, batch.text_mask)).float(), dim=-1)

    def forward(self, batch: PairBatch) -> Tensor:
        pooled = self.pool_media(batch)
        loss = self.contrastive_loss(self.embed_media(pooled[0]), self.embed_text(batch), batch)
        if self.tag_weight:
            # Per process, over its own samples: DDP's gradient average makes it the global-batch mean.
            loss = loss + self.tag_weight * self.tag_loss(pooled, batch)
        return loss

    def contrastive_loss(self, media: Tensor, text: Tensor, batch: PairBatch) -> Tensor:
        texts = batch.texts
        n = media.shape[0]
        own = list(texts[:n])  # each sample's own text; the rest are hard negatives (None: no negative)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Negatives from every process: the loss is that of the whole global batch on each rank.
            media, text = GatherRows.apply(media), GatherRows.apply(text)
            gathered: list[list[str | None]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, [own, texts])
            own = [t for part in gathered for t in part[0]]
            texts = [t for part in gathered for t in part[1]]
        # Positives are found by text, not by position, so gathered rows need no bookkeeping.
        keep = torch.tensor([t is not None for t in texts], device=media.device)
        text, texts = text[keep], [t for t in texts if t is not None]
        same = torch.tensor([[a == b for b in texts] for a in own], device=media.device)
        logits = media @ text.T * self.logit_scale.exp()
        if self.loss_kind == "siglip":
            signs = same.float() * 2 - 1
            return -F.logsigmoid(signs * (logits + self.logit_bias)).sum() / len(own)
        # CLIP: images against every text (hard negatives included), texts that belong to some image
        # against the images.
        image_to_text = F.cross_entropy(logits, same.float() / same.sum(1, keepdim=True))
        owned = same.any(0)
        to_image = same.T[owned].float()
        text_to_image = F.cross_entropy(logits.T[owned], to_image / to_image.sum(1, keepdim=True))
        return (image_to_text + text_to_image) / 2


class GatherRows(torch.autograd.Function):
    """All processes' rows, concatenated in rank order, with gradients flowing back to their owners.

    Every rank computes the same global loss, so the gradient of a rank's rows is the sum of what
    every rank's backward sends them; DDP then averages the parameter gradients over ranks, which
    gives exactly the single-process gradient of the global batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]
