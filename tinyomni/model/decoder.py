"""The Llama-family decoder (Llama, SmolLM2, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameter names are those of transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...),
so a Hugging Face state dict loads with no renaming. The decoder takes token ids or embeddings (how
images and audio enter), and writes keys/values into a preallocated `KVCache` during generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import DecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as transformers does, so bf16 runs match fp32 closely.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: DecoderConfig, longrope_factors: str = "short_factor") -> Tensor:
    """RoPE frequencies, with the "linear", "llama3" or "longrope" context-extension scaling applied.

    "dynamic" (InternLM2's dynamic NTK) changes the frequencies only once a sequence is longer than
    max_position_embeddings, which tinyomni never runs (generation stops at that context), so it is the
    plain table here. "longrope" (Phi-3): each frequency divided by its own factor, the short ones unless
    `longrope_factors` says "long_factor" (RotaryEmbedding keeps both tables)."""
    dim = config.attn_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "longrope":
        inv_freq = inv_freq / torch.tensor(scaling[longrope_factors], dtype=torch.float64)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for every position, computed once; a forward is a gather."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        scaling = config.rope_scaling or {}
        self.long_from: int | None = None
        if scaling.get("rope_type") == "longrope":
            self._longrope_tables(config, positions, scaling)

    def _longrope_tables(self, config: DecoderConfig, positions: Tensor, scaling: dict) -> None:
        """LongRoPE (Phi-3-128k): a row whose sequence is longer than original_max_position_embeddings
        (its largest position in this forward at least that) uses the long factors at every position of
        the forward, a shorter one the short factors, as transformers' Phi-3 and the original code choose;
        keys already cached keep the table they were written with. Both tables are scaled by
        attention_factor; the short one is only ever read below original_max_position_embeddings."""
        self.long_from = int(scaling["original_max_position_embeddings"])
        factor = float(scaling["attention_factor"])
        short = self.cos[:self.long_from] * factor, self.sin[:self.long_from] * factor
        self.cos, self.sin = short[0].contiguous(), short[1].contiguous()
        freqs = torch.outer(positions, rope_inverse_frequencies(config, "long_factor"))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_long", emb.cos() * factor, persistent=False)
        self.register_buffer("sin_long", emb.sin() * factor, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # [B, T] -> [B, 1, T, head_dim], broadcast over heads
        if self.long_from is not None:
            # Per row, without a device sync: rows past the switch read the long table.
            long = (position_ids.amax(dim=-1) >= self.long_from)[:, None, None, None]
            short_ids = position_ids.clamp(max=self.long_from - 1)
            cos = torch.where(long, self.cos_long[position_ids].unsqueeze(1), self.cos[short_ids].unsqueeze(1))
            sin = torch.where(long, self.sin_long[position_ids].unsqueeze(1), self.sin[short_ids].unsqueeze(1))
            return cos.to(dtype), sin.to(dtype)
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim].

    Owned by whoever generates (one per `Generation`, one per serving engine), never by the model, so
    two users of one model cannot overwrite each other's cache. Writes happen in place at given slot
    positions and no tensor ever grows. In the common case every row writes the same slots (prompts
    are left-padded) and an update is one `index_copy_`; a server batching requests of different
    ages gives each row its own slots instead.
    """

    def __init__(self, config: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.attn_head_dim)
        # Zeros, not empty: masked slots still meet the value matmul, and 0 × NaN garbage would be NaN.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, cache: CacheState, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.k[layer], self.v[layer]
        if cache.rows is None and cache.positions.dim() == 1:
            keys.index_copy_(2, cache.positions, k)
            values.index_copy_(2, cache.positions, v)
            return keys[:, :, :cache.kv_len], values[:, :, :cache.kv_len]
        B, _, T, _ = k.shape
        rows = cache.rows if cache.rows is not None else torch.arange(B, device=k.device)
        slots = cache.positions.expand(B, T) if cache.positions.dim() == 1 else cache.positions
        # Advanced indices on dims 0 and 2 put [B, T] first: values go in as [B, T, heads, dim].
        keys[rows[:, None], :, slots] = k.transpose(1, 2)
        values[rows[:, None], :, slots] = v.transpose(1, 2)
        return keys[rows, :, :cache.kv_len], values[rows, :, :cache.kv_len]


@dataclass
class CacheState:
    """Which cache this forward uses, where it writes, and how many slots attention reads."""

    kv: KVCache
    positions: Tensor  # slot indices: [T] shared by every row, or [B, T] per row
    kv_len: int  # slots 0..kv_len-1 are read (a Python int so slicing needs no device sync)
    rows: Tensor | None = None  # which cache rows this batch is (None: rows 0..B-1 = all)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attn_head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: CacheState | None) -> Tensor:
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask, cache))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
               cache: CacheState | None) -> Tensor:
        """Projected queries, keys and values [B, T, heads * head_dim] → the heads' outputs [B, T, heads *
        head_dim], before o_proj: RoPE, the cache, attention. (The visual expert projects its own.)"""
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.kv.update(self.layer_idx, cache, k, v)
        if T == 1:
            y = single_query_attention(q, k, v, mask)
        else:
            # No mask and a square score matrix means plain causal attention (the common prefill).
            is_causal = mask is None and T == k.shape[2]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
        return y.transpose(1, 2).reshape(B, T, -1)


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention for one query per row (a decode step): q [B, H, 1, D], k/v [B, KVH, L, D], mask
    [B, 1, 1, L] (True = may attend) or None → [B, H, 1, D].

    The query heads sharing a key/value head become the rows of one small matmul, so grouped-query
    attention needs no repeated keys; on CPU this is ~3 ops where SDPA's flash kernel costs ~100 µs
    per call at this size, which is most of a quantized decode step's attention time.
    """
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    scores = torch.matmul(q.view(B, kv_heads, H // kv_heads, D), k.transpose(-1, -2)).float() / math.sqrt(D)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: CacheState | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """The transformer body (transformers' `LlamaModel`): embeddings, layers, final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Decoder(nn.Module):
    """A causal LM: `model` (the body) and `lm_head`, named as in transformers' LlamaForCausalLM.

    Other decoder kinds (model/opt.py, model/phi.py) subclass it with their own body and
    `hidden_states`; the head, cache, initialisation and loss are this class's."""

    body: type[nn.Module] = DecoderModel
    head_bias = False  # Phi's head has one

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=self.head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # An engine may install a one-token step that runs every layer at once (tinyomni.engine does,
        # for quantized models): called as step(x, cos, sin, attention_mask, cache) during decode, it
        # returns the last layer's output, or None to let the layers below run. The model never
        # imports the engine; a plain attribute keeps it out of state_dict().
        self.decode_step: Callable[..., Tensor | None] | None = None
        # And a whole-token one: decode_logits(input_ids, position_ids, attention_mask, cache) runs the
        # embedding, every layer, the final norm and the head for one token a row, returning logits
        # [B, 1, vocab] (or None to take the path below), so that a decode step costs one call.
        self.decode_logits: Callable[..., Tensor | None] | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """transformers' Llama initialisation. PyTorch's default N(0, 1) embeddings, tied to the head,
        would make one token's logits dominate and a random model repeat it forever."""
        if self.lm_head.weight.is_meta:  # built only to receive a checkpoint's tensors (api.assemble)
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # --- KV cache ----------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A cache for `batch` rows of up to `max_len` tokens, on the model's device and dtype."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or weight.dtype, weight.device)

    # --- forward -----------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def hidden_states(self, x: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                      cache: CacheState | None = None, **layer_inputs: Tensor) -> Tensor:
        """Input embeddings [B, T, D] → final-norm hidden states [B, T, D] (the LM head not applied), for
        callers that need logits at a few positions only (training computes them where labels are).
        `layer_inputs` go to every layer (a decoder kind's own, e.g. the visual expert's image_mask)."""
        B, T, _ = x.shape
        if position_ids is None:
            base = cache.positions if cache is not None else torch.arange(T, device=x.device)
            # Per-row slots ([B, T]) are already per-row positions.
            position_ids = base if base.dim() == 2 else base.unsqueeze(0).expand(B, T)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        if self.decode_step is not None and T == 1 and cache is not None and not layer_inputs:
            y = self.decode_step(x, cos, sin, attention_mask, cache)
            if y is not None:
                return self.model.norm(y)
        mask = None
        if attention_mask is not None:
            mask = build_attention_mask(attention_mask.bool(), T, cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, **layer_inputs)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: CacheState | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        **layer_inputs: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns (logits, loss). `layer_inputs`: see `hidden_states`.

        attention_mask: [B, T] (no cache) or [B, kv_len] (with cache), True/1 where a real token is;
            None when no row is padded. position_ids: RoPE positions [B, T]; default 0..T-1 (or the
            cache slots). logits_to_keep: compute logits only for the last N positions (0 = all), so
            a long prefill does not build a [T, vocab] matrix it throws away.
        """
        if (self.decode_logits is not None and inputs_embeds is None and labels is None and cache is not None
                and input_ids is not None and input_ids.shape[1] == 1 and not layer_inputs):
            logits = self.decode_logits(input_ids, position_ids, attention_mask, cache)
            if logits is not None:
                return logits, None
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.hidden_states(x, position_ids, attention_mask, cache, **layer_inputs)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss


def build_attention_mask(key_valid: Tensor, q_len: int, cache: CacheState | None) -> Tensor:
    """Boolean [B, 1, q_len, k_len] mask: causal over slots, and never a padded key.

    A fully padded query row (left padding) would have no key at all and make SDPA return NaN,
    so each query may always see itself.
    """
    B, k_len = key_valid.shape
    device = key_valid.device
    q_slots = torch.arange(q_len, device=device) if cache is None else cache.positions
    q_slots = q_slots.expand(B, q_len)  # [B, q]
    k_slots = torch.arange(k_len, device=device)
    own = k_slots[None, None, :] == q_slots[:, :, None]  # [B, q, k]
    mask = (k_slots[None, None, :] <= q_slots[:, :, None]) & key_valid[:, None, :]
    return (mask | own)[:, None]
