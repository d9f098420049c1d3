"""The audio tower: a Whisper encoder over log-mel frames, then average pooling over time.

Parameter names are those of transformers' `WhisperEncoder` (`conv1`, `embed_positions`,
`layers.N.self_attn.q_proj`, `layers.N.fc1`, `layer_norm`, ...), so Whisper weights load by a rename
(see `tinyomni.checkpoints.hf_whisper`). Unlike Whisper, clips need not be padded to 30 s: the
positions are sliced to the clip's length, and a batch of unequal clips can be masked.

Qwen2-Audio's tower is the same encoder with `AudioConfig.pad_to_chunk` (features of the clip padded to
30 s, attention to the clip's positions only) and `pool_before_norm` (nn.AvgPool1d, then the final norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyomni.config import AudioConfig
from tinyomni.errors import InputError
from tinyomni.model.activations import get_activation
from tinyomni.processing.audio import CHUNK_CONTEXT_FRAMES


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed position table `[length, channels]`: sines in the first half, cosines in the second."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length).view(-1, 1) * inv_timescales.view(1, -1)
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


def conv_output_length(num_frames: int) -> int:
    """Positions after the stride-2 conv (kernel 3, padding 1): ceil(frames / 2)."""
    return (num_frames - 1) // 2 + 1


def audio_output_length(num_frames: int, config: AudioConfig) -> int:
    """How many embeddings `AudioEncoder` returns for a clip of `num_frames` mel frames (the placeholder
    count; with `pad_to_chunk`, the clip's own frames, not the chunk's).

    The pooling window at the tail averages whatever frames remain, so no frame is dropped:
    ceil(ceil(frames / 2) / pool_stride). With `pool_before_norm` only whole windows count:
    floor(ceil(frames / 2) / pool_stride), as Qwen2-Audio's `_get_feat_extract_output_lengths`.
    """
    positions = conv_output_length(num_frames)
    if config.pool_before_norm:
        return positions // config.pool_stride
    return -(-positions // config.pool_stride)


class AudioAttention(nn.Module):
    """Bidirectional multi-head self-attention; Whisper has no bias on the key projection."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        d = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class AudioEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = AudioAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.act = get_activation(config.activation_function)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), attn_mask)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # Whisper's guard: fp16 activations can overflow in long clips
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    """Log-mel `[B, n_mels, frames]` → embeddings `[B, audio_output_length(frames), d_model]`.

    With `config.pad_to_chunk` the input is one clip's features as `processing.audio.chunk_log_mel`
    gives them: its own frames and the CHUNK_CONTEXT_FRAMES after them in the padded chunk.
    """

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Fixed sinusoids as in Whisper; an Embedding (not a buffer) so the checkpoint key matches.
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(config.max_source_positions, d))
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList([AudioEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    @property
    def max_frames(self) -> int:
        """The longest input in mel frames (3000 = 30 s for Whisper's 1500 positions)."""
        return self.config.max_source_positions * 2

    def forward(self, input_features: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encode and pool. `attention_mask` `[B, frames]` marks real frames (1) versus batch padding (0).

        With a mask, each clip's output equals what it would get alone (padding is zeroed before each
        conv, hidden from attention and left out of the pooled means), and outputs past a clip's own
        `audio_output_length` are zero.
        """
        if input_features.ndim != 3 or input_features.shape[1] != self.config.num_mel_bins:
            raise InputError(f"audio features must be [batch, {self.config.num_mel_bins} mel bins, frames], "
                             f"got {tuple(input_features.shape)}")
        frames = input_features.shape[-1]
        if self.config.pad_to_chunk:
            if attention_mask is not None:
                raise InputError("this audio encoder (pad_to_chunk) takes one clip at a time, without a mask")
            frames -= CHUNK_CONTEXT_FRAMES  # the clip's own frames; the rest only feed the convs
            if frames < 1:
                raise InputError(f"audio features of a padded chunk need the clip's frames and the "
                                 f"{CHUNK_CONTEXT_FRAMES} after them, got {input_features.shape[-1]} frames")
        positions = conv_output_length(frames)
        if positions > self.config.max_source_positions:
            limit = self.max_frames  # 100 mel frames per second (hop 10 ms)
            raise InputError(f"audio features have {frames} frames ({frames / 100:.1f} s); this audio "
                             f"encoder accepts at most {limit} frames ({limit / 100:.1f} s)")
        x = input_features.to(self.conv1.weight.dtype)

        frame_mask = pos_mask = attn_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (x.shape[0], frames):
                raise InputError(f"attention_mask must be [batch, frames] = {(x.shape[0], frames)}, "
                                 f"got {tuple(attention_mask.shape)}")
            frame_mask = attention_mask.to(torch.bool)
            # Conv2 output t is centred on frame 2t, so it is real exactly when frame 2t is.
            pos_mask = frame_mask[:, ::2]
            if not pos_mask[:, 0].all():
                raise InputError("attention_mask must mark real frames from the start (right padding), "
                                 "and every clip needs at least one")
            attn_mask = pos_mask[:, None, None, :]  # [B, 1, 1, T]: keys to attend to
            x = x * frame_mask[:, None, :].to(x.dtype)

        x = F.gelu(self.conv1(x))  # Whisper's convs use exact GELU whatever activation_function says
        if frame_mask is not None:
            x = x * frame_mask[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x))
        # pad_to_chunk: positions past the clip are those Qwen2-Audio's mask hides from attention and
        # whose outputs it drops, so leaving them out computes the same numbers (a short clip costs only
        # its own length, not 30 s).
        x = x[:, :, :positions]
        x = x.transpose(1, 2) + self.embed_positions.weight[:positions].to(x.dtype)

        for layer in self.layers:
            x = layer(x, attn_mask)
        if self.config.pool_before_norm:
            return self.layer_norm(self._pool_whole_windows(x, pos_mask))
        x = self.layer_norm(x)
        return self._pool(x, pos_mask)

    def _pool_whole_windows(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """nn.AvgPool1d(pool_stride): the mean of each whole window, an incomplete tail dropped; with a
        batch mask, windows not wholly a clip's own are zero (that clip alone would not have them)."""
        s = self.config.pool_stride
        b, t, d = x.shape
        n = t // s
        means = x[:, :n * s].reshape(b, n, s, d).mean(dim=2)
        if mask is None:
            return means
        whole = mask[:, :n * s].reshape(b, n, s).all(dim=2)
        return means * whole[..., None].to(means.dtype)

    def _pool(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Average over windows of `pool_stride` positions; a short tail window averages what it has."""
        s = self.config.pool_stride
        b, t, d = x.shape
        if s == 1 and mask is None:
            return x
        weights = torch.ones(b, t, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        pad = (-t) % s
        x = F.pad(x * weights[..., None], (0, 0, 0, pad))
        weights = F.pad(weights, (0, pad))
        sums = x.view(b, (t + pad) // s, s, d).sum(dim=2)
        counts = weights.view(b, (t + pad) // s, s).sum(dim=2, keepdim=True)
        return sums / counts.clamp(min=1)
