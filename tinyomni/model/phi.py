"""A Phi decoder (Microsoft's Phi-1.5 / Phi-2), the language model of TinyGPT-V (`DecoderConfig.kind = "phi"`).

Against the Llama-family `Decoder` it differs in: one LayerNorm per layer whose output feeds attention and
the MLP in parallel, both added to the residual (x + attn(LN(x)) + mlp(LN(x))); rotary embeddings on the
first `rotary_dim` channels of each head only (`partial_rotary_factor`), the rest passed through; biases on
every linear, the LM head included; a two-layer `hidden_act` MLP (`fc1`, `fc2`); optionally a LayerNorm over
each query and key head (`qk_layernorm`). It keeps `Decoder`'s interface (`model.embed_tokens`, `lm_head`,
`new_cache`, `embed`, `hidden_states`, `forward`) and its KV cache, so generation, serving and training take
either. Parameter names are transformers' `PhiForCausalLM` names, so its state dict loads with no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import DecoderConfig
from tinyomni.model.activations import get_activation
from tinyomni.model.decoder import (
    CacheState,
    Decoder,
    apply_rope,
    build_attention_mask,
    single_query_attention,
)


class PartialRotaryEmbedding(nn.Module):
    """Cos/sin tables over the first `rotary_dim` channels of a head, for every position."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        dim = config.rotary_dim
        # float32 throughout, as transformers computes Phi's frequencies
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # [B, T] -> [B, 1, T, rotary_dim], broadcast over heads
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


class PhiAttention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attn_head_dim
        self.rotary_dim = config.rotary_dim
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim)
        self.dense = nn.Linear(self.num_heads * self.head_dim, d)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rotary_dim
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: CacheState | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.kv.update(self.layer_idx, cache, k, v)
        if T == 1:
            y = single_query_attention(q, k, v, mask)
        else:
            # No mask and a square score matrix: plain causal prefill (as in Decoder's Attention).
            is_causal = mask is None and T == k.shape[2]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class PhiMLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiLayer(nn.Module):
    """x + attn(LN(x)) + mlp(LN(x)): attention and MLP read the same normed input."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: CacheState | None) -> Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, cos, sin, mask, cache) + self.mlp(h)


class PhiModel(nn.Module):
    """The body (transformers' `PhiModel`): embeddings, layers, final LayerNorm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = PartialRotaryEmbedding(config)


class PhiDecoder(Decoder):
    """`Decoder` with Phi's body (parallel attention and MLP, partial rotary) and a biased head. The
    engine's fused one-token step is Llama-shaped: it never runs here (the layers run eagerly)."""

    body = PhiModel
    head_bias = True

    def hidden_states(self, x: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                      cache: CacheState | None = None) -> Tensor:
        """Input embeddings [B, T, D] → final-norm hidden states [B, T, D]."""
        B, T, _ = x.shape
        if position_ids is None:
            base = cache.positions if cache is not None else torch.arange(T, device=x.device)
            position_ids = base if base.dim() == 2 else base.unsqueeze(0).expand(B, T)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        mask = None
        if attention_mask is not None:
            mask = build_attention_mask(attention_mask.bool(), T, cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.model.final_layernorm(x)
