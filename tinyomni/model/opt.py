"""An OPT decoder (Zhang et al. 2022), the language model of the released BLIP-2 checkpoints
(`DecoderConfig.kind = "opt"`).

Against the Llama-family `Decoder` it differs in: learned absolute positions (an embedding offset by 2,
OPT's convention) instead of RoPE, LayerNorm instead of RMSNorm, a ReLU two-layer MLP (`fc1`, `fc2`), biases
on every linear, plain multi-head attention (no grouped keys). The pre-norm layout (`do_layer_norm_before`)
of every released size but 350m is the one built here. It keeps `Decoder`'s interface (`model.embed_tokens`,
`lm_head`, `new_cache`, `embed`, `hidden_states`, `forward`) and its KV cache, so generation, serving and
training take either. Names are transformers' `OPTForCausalLM` names without `model.decoder.`'s `decoder.`
(tinyomni/checkpoints/blip2.py renames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import DecoderConfig
from tinyomni.model.activations import get_activation
from tinyomni.model.decoder import CacheState, Decoder, build_attention_mask

POSITION_OFFSET = 2  # OPT's position embedding rows 0 and 1 are never used (a fairseq legacy)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which OPT uses


class OPTAttention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor | None, cache: CacheState | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.kv.update(self.layer_idx, cache, k, v)
        # No mask and a square score matrix: plain causal prefill; no mask otherwise: a decode step, whose
        # every cached slot is earlier (as in Decoder's Attention).
        is_causal = mask is None and T == k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


class OPTLayer(nn.Module):
    """x + attn(LN(x)), then + fc2(relu(fc1(LN(x))))."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.self_attn = OPTAttention(config, layer_idx)
        self.final_layer_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: Tensor, mask: Tensor | None, cache: CacheState | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class OPTModel(nn.Module):
    """The body: token and position embeddings, layers, final LayerNorm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        self.layers = nn.ModuleList(OPTLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)


class OPTDecoder(Decoder):
    """`Decoder` with OPT's body: learned positions, LayerNorm, a biased MLP (BLIP-2's decoders)."""

    body = OPTModel

    def hidden_states(self, x: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                      cache: CacheState | None = None) -> Tensor:
        """Input embeddings [B, T, D] → final-norm hidden states [B, T, D]."""
        B, T, _ = x.shape
        if position_ids is None:
            base = cache.positions if cache is not None else torch.arange(T, device=x.device)
            position_ids = base if base.dim() == 2 else base.unsqueeze(0).expand(B, T)
        x = x + self.model.embed_positions(position_ids + POSITION_OFFSET).to(x.dtype)
        mask = None
        if attention_mask is not None:
            mask = build_attention_mask(attention_mask.bool(), T, cache)
        for layer in self.model.layers:
            x = layer(x, mask, cache)
        return self.model.final_layer_norm(x)
