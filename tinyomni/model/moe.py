"""A mixture-of-experts decoder (`DecoderConfig.kind = "moe"`), the language model of Aria (Rhymes AI).

Each layer is the Llama layer (RMSNorm, RoPE attention with GQA) with its MLP replaced by `MoEMLP`:
- a router, one bias-free linear map to `num_experts` logits per token; each token goes to the
  `num_experts_per_tok` experts with the largest logits, weighted by a softmax over those chosen logits
  alone (Aria's rule; the same as renormalising a softmax over every expert);
- `num_experts` routed experts, each a SwiGLU MLP of width `intermediate_size` (always SiLU, as in Aria);
- shared experts that every token goes through: one SwiGLU MLP of width `intermediate_size *
  num_shared_experts` with `hidden_act`, added to the routed output.

Experts are plain `nn.Linear`s in a `ModuleList` (`experts.3.gate_proj`), so the engine's quantizer, which
swaps every `nn.Linear`, covers them with no MoE-specific code; Aria's checkpoints stack them into 3-D
tensors, and checkpoints/aria.py splits those. The router is not an `nn.Linear` on purpose: it stays in
float when the rest is quantized, since a small weight error there changes which experts a token meets.

While training, each `MoEMLP` counts how many token slots each expert received (`take_routing_load`
reads and resets the counts, for the training log) and, with `router_aux_loss_coef`, keeps the
Switch Transformer load-balancing loss of its last forward (`routing_aux_loss`; Fedus et al. 2021:
num_experts * sum_e f_e * P_e, f the fraction of slots routed to e, P the mean router probability of e).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import DecoderConfig
from tinyomni.model.activations import get_activation
from tinyomni.model.decoder import Attention, CacheState, Decoder, RMSNorm, RotaryEmbedding


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)): one expert, or the shared experts (transformers' names)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Token → `num_experts` logits (a weight [num_experts, hidden], no bias; deliberately not nn.Linear)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class MoEMLP(nn.Module):
    """Routed experts plus shared experts, in place of a layer's MLP: [..., D] → [..., D]."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        d, width = config.hidden_size, config.intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.aux_loss_coef = config.router_aux_loss_coef
        self.router = Router(d, config.num_experts)
        self.experts = nn.ModuleList(SwiGLU(d, width) for _ in range(config.num_experts))
        self.shared_experts = (SwiGLU(d, width * config.num_shared_experts, config.hidden_act)
                               if config.num_shared_experts else None)
        # Training statistics (not state_dict entries): slots per expert since the last take_routing_load.
        self.load_counts = torch.zeros(config.num_experts)
        self.aux_loss: Tensor | None = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens [N, D] → (router logits [N, E], weights [N, k], expert indices [N, k])."""
        logits = self.router(x)
        top_logits, top_index = torch.topk(logits, self.top_k, dim=-1)
        return logits, top_logits.softmax(-1), top_index

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, weights, index = self.route(tokens)
        out = torch.zeros_like(tokens)
        # One pass per expert over the tokens routed to it (a decode step meets at most k experts per row).
        hits = torch.bincount(index.flatten(), minlength=self.num_experts)
        for e in hits.nonzero().flatten().tolist():
            token_idx, slot = torch.where(index == e)
            y = self.experts[e](tokens[token_idx]) * weights[token_idx, slot, None].to(tokens.dtype)
            out = out.index_add(0, token_idx, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        if self.training:
            self._record(logits, index, hits)
        return out.view(shape)

    def _record(self, logits: Tensor, index: Tensor, hits: Tensor) -> None:
        self.load_counts = self.load_counts.to(hits.device) + hits.detach().float()
        if self.aux_loss_coef:
            fraction = hits.float() / index.numel()  # f_e: share of the token slots (no gradient, as in Switch)
            probs = logits.float().softmax(-1).mean(0)  # P_e: mean router probability (the gradient path)
            self.aux_loss = self.aux_loss_coef * self.num_experts * (fraction * probs).sum()


class MoEDecoderLayer(nn.Module):
    """The Llama layer with `MoEMLP` as its MLP (transformers' AriaTextDecoderLayer)."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: CacheState | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEDecoderModel(nn.Module):
    """The body (transformers' `AriaTextModel`): embeddings, MoE layers, final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class MoEDecoder(Decoder):
    """`Decoder` with MoE layers. `hidden_states`, the cache and the loss are Decoder's; the engine's fused
    one-token step is Llama-shaped and declines these layers, so they run eagerly (quantized or not)."""

    body = MoEDecoderModel

    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        if self.lm_head.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """Every `MoEMLP` under `model`, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def take_routing_load(model: nn.Module) -> list[list[float]] | None:
    """Per MoE layer, the fraction of token slots each expert received since the last call (training
    forwards only), and reset the counts; None when the model has no MoE layer or saw no tokens."""
    layers = moe_layers(model)
    if not layers or not any(float(m.load_counts.sum()) for m in layers):
        return None
    load = []
    for m in layers:
        counts = m.load_counts.float()
        load.append((counts / counts.sum().clamp(min=1)).tolist())
        m.load_counts = torch.zeros_like(counts)
    return load


def routing_aux_loss(model: nn.Module) -> Tensor | None:
    """The load-balancing loss of the MoE layers' last training forward, averaged over layers (so the
    coefficient means the same at any depth), and cleared; None when there is none."""
    losses = []
    for m in moe_layers(model):
        if m.aux_loss is not None:
            losses.append(m.aux_loss)
            m.aux_loss = None
    return torch.stack(losses).mean() if losses else None
