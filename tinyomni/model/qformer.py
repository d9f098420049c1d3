"""The Q-Former connector (BLIP-2, InstructBLIP, TinyGPT-V): a fixed set of learned queries reads the ViT.

`num_query_tokens` learned query vectors go through BERT-style post-norm layers: self-attention among the
queries, cross-attention from the queries to the vision tower's features every `cross_attention_frequency`
layers (layer 0 first), a feed-forward block; a Linear then maps each query to the decoder width. So an
image costs `num_query_tokens` decoder tokens whatever its number of patches.

The instruction-aware variant (InstructBLIP) also feeds the instruction's tokens, in the Q-Former's own
(BERT) vocabulary, into the self-attention beside the queries: word + position embeddings, a LayerNorm over
[queries; text], and a feed-forward block of their own (`intermediate` / `output`; the queries use
`intermediate_query` / `output_query`). Only the queries cross-attend to the image, and only they leave.

Parameter names are transformers' `Blip2QFormerModel` / `InstructBlipQFormerModel` names under `qformer.`,
beside `query_tokens` and `language_projection`, so importing is a prefix (tinyomni/checkpoints/instructblip.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import QFormerConfig
from tinyomni.errors import InputError
from tinyomni.model.activations import get_activation


class QFormerMultiHeadAttention(nn.Module):
    """query / key / value linears with biases; keys and values from `context` (the image when crossing)."""

    def __init__(self, config: QFormerConfig, context_size: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(context_size, d)
        self.value = nn.Linear(context_size, d)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        n, length, d = x.shape
        q = self.query(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(context).view(n, context.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(context).view(n, context.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(n, length, d)


class QFormerResidual(nn.Module):
    """BERT's post-norm step: LayerNorm(dense(h) + x) (`*.output` in transformers' names)."""

    def __init__(self, in_features: int, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + x)


class QFormerAttention(nn.Module):
    def __init__(self, config: QFormerConfig, context_size: int) -> None:
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, context_size)
        self.output = QFormerResidual(config.hidden_size, config)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.output(self.attention(x, context, mask), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention of the queries to the image (every
    `cross_attention_frequency` layers), then the queries' and the text's own feed-forward blocks."""

    def __init__(self, config: QFormerConfig, index: int, encoder_hidden_size: int) -> None:
        super().__init__()
        self.attention = QFormerAttention(config, config.hidden_size)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, encoder_hidden_size)
        if config.instruction_aware:  # the instruction's tokens have a feed-forward block of their own
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerResidual(config.intermediate_size, config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerResidual(config.intermediate_size, config)

    def forward(self, x: Tensor, image: Tensor, num_queries: int, mask: Tensor | None) -> Tensor:
        x = self.attention(x, x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.has_cross_attention:
            queries = self.crossattention(queries, image)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.output(self.intermediate(text), text)], dim=1)


class QFormerEncoder(nn.Module):
    """The stack of layers; a module of its own only so names read `encoder.layer.N`."""

    def __init__(self, config: QFormerConfig, encoder_hidden_size: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i, encoder_hidden_size)
                                   for i in range(config.num_hidden_layers))

    def forward(self, x: Tensor, image: Tensor, num_queries: int, mask: Tensor | None) -> Tensor:
        for layer in self.layer:
            x = layer(x, image, num_queries, mask)
        return x


class QFormerEmbeddings(nn.Module):
    """InstructBLIP's: the instruction's word + position embeddings, after the queries, then one LayerNorm."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, queries: Tensor, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        text = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.layernorm(torch.cat([queries, text.to(queries.dtype)], dim=1))


class QFormerModel(nn.Module):
    """Queries (+ instruction ids) and image features → the queries' last hidden states."""

    def __init__(self, config: QFormerConfig, encoder_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        if config.instruction_aware:
            self.embeddings = QFormerEmbeddings(config)
        else:  # BLIP-2 normalises the queries alone, at the model's top level
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = QFormerEncoder(config, encoder_hidden_size)

    def forward(self, queries: Tensor, image: Tensor, ids: Tensor | None = None,
                ids_mask: Tensor | None = None) -> Tensor:
        num_queries = queries.shape[1]
        mask = None
        if ids is None:
            x = self.layernorm(queries)
        else:
            x = self.embeddings(queries, ids)
            if ids_mask is not None:  # padded instructions of a batch: keys the queries and text must not see
                keep = torch.cat([ids_mask.new_ones(ids.shape[0], num_queries), ids_mask], dim=1)
                mask = keep[:, None, None, :]
        return self.encoder(x, image, num_queries, mask)[:, :num_queries]


class QFormerConnector(nn.Module):
    """ProjectorConfig.kind "qformer": image features [n, tokens, D] (+ each image's instruction ids) →
    [n, num_query_tokens, decoder_hidden]."""

    def __init__(self, config: QFormerConfig, encoder_hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.config = config
        # [1, N, H] as transformers stores it, so the tensor loads as it is.
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, config.hidden_size) * 0.02)
        self.qformer = QFormerModel(config, encoder_hidden_size)
        self.language_projection = nn.Linear(config.hidden_size, out_features)

    def forward(self, features: Tensor, instructions: list[Tensor] | None = None) -> Tensor:
        n = features.shape[0]
        queries = self.query_tokens.to(features.dtype).expand(n, -1, -1)
        ids = ids_mask = None
        if self.config.instruction_aware:
            ids, ids_mask = self._instruction_batch(instructions, n, features.device)
        elif instructions:
            raise InputError("this model's Q-Former takes no instruction (qformer_input_ids): it is not "
                             "instruction-aware (ProjectorConfig.qformer.instruction_aware is false)")
        return self.language_projection(self.qformer(queries, features, ids, ids_mask))

    def _instruction_batch(self, instructions: list[Tensor] | None, n: int,
                           device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Each image's instruction ids, right-padded into one [n, L] tensor, and the mask of real tokens
        (None when none is padded)."""
        if instructions is None or len(instructions) != n:
            got = "none" if instructions is None else len(instructions)
            raise InputError(f"this model's Q-Former reads the instruction (InstructBLIP): it needs one "
                             f"qformer_input_ids per image, {n} here, got {got} (ChatProcessor makes them: "
                             "Prompt.qformer_input_ids)")
        limit = self.config.max_position_embeddings
        lengths = [int(t.numel()) for t in instructions]
        if max(lengths) > limit:
            raise InputError(f"the instruction is {max(lengths)} Q-Former tokens; this Q-Former takes at most "
                             f"{limit} (max_position_embeddings)")
        if min(lengths) == 0:
            raise InputError("an image's Q-Former instruction (qformer_input_ids) is empty")
        width = max(lengths)
        ids = torch.zeros(n, width, dtype=torch.long, device=device)
        mask = torch.zeros(n, width, dtype=torch.bool, device=device)
        for row, t in enumerate(instructions):
            ids[row, :lengths[row]] = t.reshape(-1).to(device)
            mask[row, :lengths[row]] = True
        if int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0:
            raise InputError(f"a Q-Former instruction id is outside its vocabulary of {self.config.vocab_size}")
        return ids, None if all(n_ == width for n_ in lengths) else mask
