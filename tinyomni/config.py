"""Configuration dataclasses for every part of an omni model, with a validated JSON round trip.

One dataclass per part; the model modules take these, never loose keyword arguments. `OmniConfig`
is what a checkpoint's `config.json` holds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tinyomni.errors import ConfigError

T = TypeVar("T")


@dataclass
class VisionConfig:
    """A ViT: enough switches for SigLIP-, CLIP- and InternViT-shaped weights."""

    image_size: int = 448  # the tile side the position embeddings were trained for
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    hidden_act: str = "gelu_pytorch_tanh"  # "gelu" (exact erf) for CLIP / InternViT
    layer_norm_eps: float = 1e-6
    norm_type: str = "layer_norm"  # or "rms_norm" (InternViT-6B)
    qkv_bias: bool = True
    use_cls_token: bool = False  # CLIP and InternViT prepend one; SigLIP does not
    pre_layernorm: bool = False  # CLIP normalises embeddings before the blocks
    post_layernorm: bool = True  # SigLIP/CLIP final norm; InternViT has none
    layer_scale_init: float | None = None  # InternViT: learnable per-channel residual scale
    qk_norm: bool = False  # InternViT-6B normalises queries and keys
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Channels of a convolutional stem in place of the one-step patch embedding (a "hybrid" ViT, as in
    # Xiao et al. 2021, "Early convolutions help transformers see better"): one 3x3 stride-2
    # conv + BatchNorm + GELU per entry, so 2**len == patch_size. Empty for SigLIP/CLIP/InternViT.
    conv_stem: tuple[int, ...] = ()
    # Which hidden state the projector reads (InternVL's vision_feature_layer / select_layer): -1 the
    # last block's output after the final norm; otherwise transformers' hidden_states index (0 the
    # embeddings, k the output of block k, negative counted from the end), without the final norm.
    feature_layer: int = -1
    # Several hidden states concatenated along the channels (LLaVA's list vision_feature_layer), each a
    # hidden_states index as above, never with the final norm; empty: feature_layer alone.
    feature_layers: tuple[int, ...] = ()
    # Which of the tower's tokens the projector reads: "patches" drops the CLS token when the tower has
    # one (InternVL, and LLaVA's "default" on CLIP); "full" keeps every token (LLaVA's "full");
    # "drop_first" drops the first token whatever it is (LLaVA's "default" on a tower without CLS).
    feature_select: str = "patches"
    # Idefics3 / SmolVLM's position ids (NaViT-style): each patch's fractional coordinate (row / rows,
    # column / columns, in float32) is bucketed into the trained grid. On most grids that is the plain
    # index, but float rounding moves some patches one bucket on others (e.g. 19, 25, 29, 31 patches a
    # side), so imported weights need exactly these ids. False: indices (resized bicubically when the
    # grid differs from the trained one).
    position_buckets: bool = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def validate(self) -> None:
        _require(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of patch_size")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 "vision.hidden_size must be divisible by num_attention_heads")
        _require(self.norm_type in ("layer_norm", "rms_norm"), "vision.norm_type must be layer_norm or rms_norm")
        _require(self.hidden_act in ACTIVATIONS, f"vision.hidden_act must be one of {sorted(ACTIVATIONS)}")
        _require(not self.conv_stem or 2 ** len(self.conv_stem) == self.patch_size,
                 f"vision.conv_stem has {len(self.conv_stem)} stride-2 convs, which make patches of "
                 f"{2 ** len(self.conv_stem)} px, not patch_size {self.patch_size}")
        _require(all(c > 0 for c in self.conv_stem), "vision.conv_stem channels must be positive")
        for layer in (self.feature_layer, *self.feature_layers):
            _require(-self.num_hidden_layers - 1 <= layer <= self.num_hidden_layers,
                     f"vision.feature_layer must be in [-{self.num_hidden_layers + 1}, {self.num_hidden_layers}] "
                     f"for {self.num_hidden_layers} layers, got {layer}")
        _require(self.feature_select in FEATURE_SELECT,
                 f"vision.feature_select must be one of {', '.join(FEATURE_SELECT)}, got {self.feature_select!r}")

    @property
    def num_feature_tokens(self) -> int:
        """Tokens per tile the projector reads (before any pixel shuffle), by feature_select."""
        prefix = 1 if self.use_cls_token else 0
        kept = {"patches": 0, "full": prefix, "drop_first": prefix - 1}[self.feature_select]
        return self.num_patches + kept

    @property
    def num_feature_layers(self) -> int:
        return len(self.feature_layers) or 1


@dataclass
class AudioConfig:
    """A Whisper-style encoder over log-mel frames (16 kHz, hop 10 ms)."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # after the stride-2 conv: 1500 positions = 30 s
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    pool_stride: int = 2  # average-pool the encoder output: 2 → 25 tokens per second
    # Qwen2-Audio's layout (both False by default). pad_to_chunk: a clip's features are those of
    # the clip zero-padded to the 30 s chunk, as WhisperFeatureExtractor(padding="max_length") makes them
    # (one dB floor for the whole chunk; see processing/audio.chunk_log_mel), and the encoder sees only the
    # clip's positions (its attention mask). pool_before_norm: average-pool before the final LayerNorm, over
    # whole windows only, an odd tail position dropped (nn.AvgPool1d); False: after it, a short tail window
    # averaging what it has.
    pad_to_chunk: bool = False
    pool_before_norm: bool = False

    def validate(self) -> None:
        _require(self.d_model % self.encoder_attention_heads == 0,
                 "audio.d_model must be divisible by encoder_attention_heads")
        _require(self.pool_stride >= 1, "audio.pool_stride must be >= 1")
        _require(self.activation_function in ACTIVATIONS,
                 f"audio.activation_function must be one of {sorted(ACTIVATIONS)}")


@dataclass
class QFormerConfig:
    """ProjectorConfig.kind "qformer" (BLIP-2 / InstructBLIP's Querying Transformer, tinyomni.model.qformer):
    num_query_tokens learned queries through BERT-style layers, cross-attending to the tower's features every
    cross_attention_frequency layers, then a Linear to the decoder width: that many tokens per tile.
    instruction_aware (InstructBLIP): the instruction's tokens, in the Q-Former's own vocabulary (vocab_size,
    max_position_embeddings positions), join the queries in the self-attention."""

    num_query_tokens: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    instruction_aware: bool = False
    vocab_size: int = 30522
    max_position_embeddings: int = 512

    def validate(self) -> None:
        _require(min(self.num_query_tokens, self.hidden_size, self.num_hidden_layers, self.num_attention_heads,
                     self.intermediate_size, self.cross_attention_frequency) > 0,
                 "projector.qformer sizes, layers, heads and cross_attention_frequency must be positive")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 "projector.qformer.hidden_size must be divisible by num_attention_heads")
        _require(self.hidden_act in ACTIVATIONS, f"projector.qformer.hidden_act must be one of {sorted(ACTIVATIONS)}")
        _require(not self.instruction_aware or min(self.vocab_size, self.max_position_embeddings) > 0,
                 "projector.qformer.vocab_size and max_position_embeddings must be positive (instruction_aware)")


@dataclass
class ProjectorConfig:
    """LayerNorm → Linear → activation (GELU) → Linear from an encoder's (shuffled) features to the decoder width
    (kind "mlp"), or one bias-free Linear (kind "linear": Idefics3 / SmolVLM's `modality_projection.proj`)."""

    downsample_ratio: float = 0.5  # pixel shuffle; 0.5 keeps a quarter of the tokens (vision only)
    hidden_size: int | None = None  # None: the decoder's hidden size
    hidden_act: str = "gelu"  # between the two linears (InternVL's projector_hidden_act)
    layer_norm: bool = True  # InternVL normalises the input first; LLaVA's projector has no LayerNorm
    kind: str = "mlp"  # "linear": no LayerNorm, activation or hidden layer (hidden_size, hidden_act unused)
    # kind "linear" with a bias, for the audio projector only (Qwen2-Audio's multi_modal_projector.linear)
    linear_bias: bool = False
    # kind "resampler" (Idefics2's perceiver resampler, tinyomni.model.resampler): a gated MLP to the decoder
    # width (hidden_size its inner width, hidden_act its gate's activation), then resampler_n_latents learned
    # latents that attend, resampler_depth times, to [features ; latents]: that many tokens per tile,
    # whatever the tile's size. layer_norm is unused.
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    resampler_n_kv_heads: int = 4
    resampler_hidden_act: str = "silu"  # the perceiver blocks' gated MLP
    resampler_rms_norm_eps: float = 1e-6
    # kind "qformer": the Q-Former's settings (None: QFormerConfig's defaults); downsample_ratio must be 1.
    qformer: QFormerConfig | None = None
    # kind "aria" (Aria's projector, tinyomni.model.aria_projector): aria_num_queries learned queries (the first
    # of aria_query_rows stored ones; None: as many) cross-attend once to the tower's features (the tower's
    # heads), then LayerNorm → Linear → GELU (tanh) → Linear to the decoder width (hidden_size: the inner width,
    # None: the decoder's). That many tokens per tile; downsample_ratio must be 1.
    aria_num_queries: int = 128
    aria_query_rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "qformer" and self.qformer is None:
            self.qformer = QFormerConfig()
        if isinstance(self.qformer, dict):  # from JSON or a recipe
            self.qformer = _build(QFormerConfig, self.qformer, "projector.qformer")

    def validate(self) -> None:
        _require(0 < self.downsample_ratio <= 1, "projector.downsample_ratio must be in (0, 1]")
        if self.kind == "qformer":
            _require(self.downsample_ratio == 1, "projector.kind 'qformer' reads every feature token: "
                     "downsample_ratio must be 1")
            self.qformer.validate()
        _require(self.kind in PROJECTOR_KINDS,
                 f"projector.kind must be one of {', '.join(PROJECTOR_KINDS)}, got {self.kind!r}")
        _require(self.hidden_act in ACTIVATIONS, f"projector.hidden_act must be one of {sorted(ACTIVATIONS)}")
        _require(round(1 / self.downsample_ratio) == 1 / self.downsample_ratio,
                 "projector.downsample_ratio must be 1/k for an integer k")
        if self.kind == "resampler":
            _require(min(self.resampler_n_latents, self.resampler_depth, self.resampler_n_heads,
                         self.resampler_head_dim, self.resampler_n_kv_heads) > 0,
                     "projector.resampler_n_latents, _depth, _n_heads, _head_dim and _n_kv_heads must be positive")
            _require(self.resampler_n_heads % self.resampler_n_kv_heads == 0,
                     "projector.resampler_n_heads must be a multiple of resampler_n_kv_heads")
            _require(self.resampler_hidden_act in ACTIVATIONS,
                     f"projector.resampler_hidden_act must be one of {sorted(ACTIVATIONS)}")


@dataclass
class DecoderConfig:
    """A Llama-family decoder (Llama, SmolLM2, Qwen2). Field names follow transformers' configs."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    # {"rope_type": "linear"|"llama3"|"dynamic", "factor": ...}, or "longrope" with LONGROPE_KEYS (Phi-3)
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # Qwen2 has q/k/v bias
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # "opt": an OPT decoder (tinyomni.model.opt: learned positions, LayerNorm, a hidden_act MLP with biases;
    # num_key_value_heads = num_attention_heads, rms_norm_eps and the RoPE fields unused), as in BLIP-2.
    kind: str = "llama"
    # "phi": a Phi-2 decoder (tinyomni.model.phi: parallel attention and MLP after one LayerNorm, biases
    # everywhere, the LM head's too; rms_norm_eps and rope_scaling unused). Rotary embeddings cover the first
    # int(head_dim * partial_rotary_factor) channels of each head; qk_layernorm: a LayerNorm over each
    # query and key head. Unused by the other kinds.
    partial_rotary_factor: float = 1.0
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = False
    # "moe": a mixture-of-experts decoder (tinyomni.model.moe; Aria's text model): a Llama layer whose MLP is
    # num_experts routed SwiGLU experts of intermediate_size each, num_experts_per_tok of them per token (top-k
    # of a bias-free router's logits, softmax over the chosen), plus an always-on shared MLP as wide as
    # num_shared_experts experts (0: none). router_aux_loss_coef weighs the Switch-style load-balancing loss
    # in training (0: none). Unused by the other kinds.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 2
    router_aux_loss_coef: float = 0.0
    # CogVLM's deep fusion (tinyomni.model.visual_expert): every layer also holds a second set of attention
    # projections and a second MLP that image tokens use (text tokens keep the usual ones). kind "llama" only.
    visual_expert: bool = False

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (Phi's partial rotary; all of them otherwise)."""
        return int(self.attn_head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "decoder.num_attention_heads must be a multiple of num_key_value_heads")
        _require(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
                 "decoder.hidden_size must be divisible by num_attention_heads (or set head_dim)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _require(kind in ("linear", "llama3", "default", "dynamic", "longrope"),
                     f"decoder.rope_scaling type {kind!r} is not supported (linear, llama3, dynamic, longrope)")
            # longrope (Phi-3): per-channel short/long factors, switched at original_max_position_embeddings
            _require(kind != "longrope" or all(k in self.rope_scaling for k in LONGROPE_KEYS),
                     f"decoder.rope_scaling longrope needs {', '.join(LONGROPE_KEYS)}")
        _require(self.kind in ("llama", "opt", "phi", "moe"),
                 f"decoder.kind must be llama, opt, phi or moe, got {self.kind!r}")
        _require(not self.visual_expert or self.kind == "llama",
                 f"decoder.visual_expert needs decoder.kind 'llama', got {self.kind!r}")
        _require(self.kind != "moe" or (1 <= self.num_experts_per_tok <= self.num_experts
                                        and self.num_shared_experts >= 0 and self.router_aux_loss_coef >= 0),
                 f"decoder.kind 'moe' routes each token to num_experts_per_tok ({self.num_experts_per_tok}) of "
                 f"num_experts ({self.num_experts}): it must be in [1, num_experts]; num_shared_experts and "
                 "router_aux_loss_coef must be >= 0")
        _require(self.kind != "phi" or (0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0
                                        and self.rotary_dim > 0),
                 f"decoder.partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} rotary "
                 f"channels of {self.attn_head_dim}: it must be in (0, 1] and give a positive even count")
        _require(self.kind != "opt" or (self.num_key_value_heads == self.num_attention_heads
                                        and self.head_dim in (None, self.hidden_size // self.num_attention_heads)),
                 "decoder.kind 'opt' has plain multi-head attention: num_key_value_heads = num_attention_heads")


@dataclass
class OmniConfig:
    """The whole model: decoder plus optional vision and audio towers, and the media token layout."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    vision_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    audio_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(downsample_ratio=1.0))
    # Media tokens. Their ids are found in the tokenizer at load time, never stored here.
    image_start_token: str = "<img>"
    image_end_token: str = "</img>"
    image_context_token: str = "<IMG_CONTEXT>"
    audio_start_token: str = "<audio>"
    audio_end_token: str = "</audio>"
    audio_context_token: str = "<AUDIO_CONTEXT>"
    # Dynamic resolution (InternVL): tiles per image, and whether to add a thumbnail tile.
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    # "Image-k: " before each image of a conversation with several (InternVL's own convention); the
    # transformers InternVL processor adds none, so checkpoints imported in that layout say False.
    number_images: bool = True
    # <img> … </img> around each image's <IMG_CONTEXT> run (InternVL); LLaVA writes the run bare.
    image_wrap: bool = True
    # True: the chat template writes image_context_token once for each image part it is given (as
    # transformers' processors expect, e.g. LLaVA's "<image>\n", images first), and each occurrence
    # becomes the next image's run. False: the template sees each message's content as one string and
    # images sit where they are in the content, each followed by a newline.
    images_in_template: bool = False
    # The same for audio (Qwen2-Audio's template writes "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    # for each audio part): each audio_context_token the template writes becomes the next clip's run, and
    # the start and end tokens around it are the template's own text.
    audio_in_template: bool = False
    # How an image becomes tiles: "tiles" (InternVL's dynamic resolution, min_tiles..max_tiles) or
    # "shortest_edge" (CLIP's processor: resize the shorter side to image_shortest_edge, keeping the
    # aspect ratio, then centre-crop one tile). image_pad_to_square first pads the image to a square with
    # the mean colour, centred (LLaVA's "pad" aspect mode).
    image_resize: str = "tiles"
    image_shortest_edge: int | None = None  # None: the tile size
    image_pad_to_square: bool = False
    # image_resize "longest_edge" (Idefics3 / SmolVLM's image processor): resize the longer side to
    # image_longest_edge (None: the tile size), then, with image_splitting, to whole tiles, cut into
    # rows × columns tiles plus a global image of the whole picture; without it, one square tile. The
    # resizes are Lanczos (Pillow), as those checkpoints' processors resize. min/max_tiles do not apply.
    image_longest_edge: int | None = None
    image_splitting: bool = True
    # How an image's placeholder is written: "run" (its tokens in one run, wrapped by image_wrap) or
    # "grid" (Idefics3 / SmolVLM: each tile as image_start_token, "<row_r_col_c>" and its run, a newline
    # after each row, then the global image as "\n", image_start_token, image_global_token, its run and
    # image_start_token again; one tile alone is only the global part). See processing/smolvlm.py.
    image_prompt: str = "run"
    # image_prompt "prefix" (BLIP-2 / InstructBLIP's processors): every image's run at the very start of the
    # prompt, before any BOS, and nothing where the image sits in the conversation.
    # image_resize "native" (Idefics2's image processor): each image keeps its aspect ratio and about its own
    # size (the longer side at most image_longest_edge, each side at least image_shortest_edge), with
    # image_splitting its four quarters first and the whole image last; the images of a prompt are padded
    # (bottom, right) to the largest, padding pixels NaN (the vision tower masks them). It needs the
    # resampler, whose token count does not depend on the size. image_prompt "tile_runs" (Idefics2Processor):
    # each tile's run between image_start_token's, images next to each other sharing one, a space after the
    # last when a word follows. See processing/idefics2.py.
    # image_resize "aria" (AriaImageProcessor, no splitting): the longer side resized (bicubic) to the tile
    # (the tower's image_size), the other kept in proportion but at least image_shortest_edge (None: 1 px), then
    # padded bottom and right to the square tile with NaN pixels (projector.kind "aria" masks them).
    # See processing/aria.py.
    image_global_token: str = "<global-img>"
    # image_resize "anyres" (LLaVA-NeXT's image processor): the image at the best of these (height, width)
    # resolutions (multiples of the tile), cut into tiles after its whole-image tile (resized to
    # image_shortest_edge², or the tile); the model packs the grid's features with image_newline after each
    # row, so an image's token count depends on its size. See processing/llava_next.py, model/anyres.py.
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)
    video_frames: int = 8
    # How a video is written into the prompt (processing/video.py): "frames" (InternVL: "Frame1: " and the
    # frame's image before each newline) or "timestamps" (SmolVLM: an intro sentence, then
    # "\nFrame from MM:SS:" and the frame's image, clips sampled about one frame a second). With
    # images_in_template the template writes video_token for each video part, and that is where it goes.
    video_prompt: str = "frames"
    video_token: str = "<video>"
    # Where the decoder weights come from when this checkpoint does not store them (e.g. "smollm2").
    base_decoder: str | None = None
    # The whole model this checkpoint fine-tunes (anything tinyomni.load takes: an imported InternVL
    # directory, a tinyomni checkpoint, a hub id), when it stores only the tensors training changed
    # (plus its LoRA adapter). A relative path is resolved against the checkpoint's directory first.
    base_model: str | None = None
    model_type: str = "tinyomni"

    @property
    def image_tokens_per_tile(self) -> int:
        if self.vision is None:
            return 0
        if self.vision_projector.kind == "resampler":  # a fixed number of latents, whatever the tile
            return self.vision_projector.resampler_n_latents
        if self.vision_projector.kind == "qformer":  # a fixed number of learned queries, whatever the tile
            return self.vision_projector.qformer.num_query_tokens
        if self.vision_projector.kind == "aria":  # Aria's learned queries
            return self.vision_projector.aria_num_queries
        r = self.vision_projector.downsample_ratio
        return round(self.vision.num_feature_tokens * r * r)  # round: r = 1/3 is not exact in binary

    def validate(self) -> None:
        self.decoder.validate()
        if self.vision is not None:
            self.vision.validate()
            self.vision_projector.validate()
            side = self.vision.grid_size * self.vision_projector.downsample_ratio
            _require(side == int(side), "vision grid size times projector.downsample_ratio must be an integer")
            _require(self.vision.num_feature_tokens == self.vision.num_patches
                     or self.vision_projector.downsample_ratio == 1,
                     "pixel shuffle needs the patch grid: with vision.feature_select "
                     f"{self.vision.feature_select!r} projector.downsample_ratio must be 1")
        _require(self.image_resize in IMAGE_RESIZE,
                 f"image_resize must be one of {', '.join(IMAGE_RESIZE)}, got {self.image_resize!r}")
        _require(self.image_resize == "tiles" or self.min_tiles == self.max_tiles == 1,
                 f"image_resize {self.image_resize!r} makes one tile per image: min_tiles and max_tiles must be 1")
        _require(self.image_shortest_edge is None or self.image_shortest_edge > 0,
                 "image_shortest_edge must be positive")
        _require(self.image_longest_edge is None or self.image_longest_edge > 0, "image_longest_edge must be positive")
        _require(self.image_prompt in IMAGE_PROMPTS,
                 f"image_prompt must be one of {', '.join(IMAGE_PROMPTS)}, got {self.image_prompt!r}")
        _require(self.video_prompt in VIDEO_PROMPTS,
                 f"video_prompt must be one of {', '.join(VIDEO_PROMPTS)}, got {self.video_prompt!r}")
        _require(self.image_resize != "native" or (self.vision_projector.kind == "resampler"
                                                   and self.vision_projector.downsample_ratio == 1),
                 "image_resize 'native' (images of any size) needs projector.kind 'resampler' and "
                 "downsample_ratio 1: a fixed number of tokens per tile, whatever its size")
        if self.image_resize == "anyres":
            self._validate_anyres()
        _require((self.image_resize == "aria") == (self.vision_projector.kind == "aria")
                 or self.vision is None,
                 "image_resize 'aria' (one tile per image, padded bottom-right) and projector.kind 'aria' "
                 "(which masks that padding) go together")
        if self.vision_projector.kind == "aria" and self.vision is not None:
            p = self.vision_projector
            _require(p.downsample_ratio == 1 and 0 < p.aria_num_queries <= (p.aria_query_rows or p.aria_num_queries),
                     "projector.kind 'aria' reads every feature token (downsample_ratio 1) with aria_num_queries "
                     "> 0 of its aria_query_rows queries")
            _require(not self.vision.use_cls_token, "projector.kind 'aria' needs a vision tower without a CLS token")
        if self.audio is not None:
            self.audio.validate()
            _require(self.audio_projector.kind in ("mlp", "linear"),
                     f"audio_projector.kind must be mlp or linear, got {self.audio_projector.kind!r}")
        _require(not self.vision_projector.linear_bias,
                 "vision_projector.linear_bias is not supported (the vision linear projector has no bias)")
        _require(1 <= self.min_tiles <= self.max_tiles, "min_tiles must be >= 1 and <= max_tiles")

    def _validate_anyres(self) -> None:
        """image_resize "anyres" (LLaVA-NeXT): a grid of tiles, packed by model/anyres.py."""
        _require(self.vision is not None and self.vision_projector.kind == "mlp"
                 and self.vision_projector.downsample_ratio == 1,
                 "image_resize 'anyres' needs a vision tower and the mlp projector without pixel shuffle")
        _require(self.vision.num_feature_tokens == self.vision.num_patches,
                 "image_resize 'anyres' lays each tile's features out on its patch grid: vision.feature_select "
                 f"{self.vision.feature_select!r} keeps {self.vision.num_feature_tokens} tokens of "
                 f"{self.vision.num_patches} patches")
        tile = self.vision.image_size
        _require(bool(self.image_grid_pinpoints) and all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int) and v > 0 and v % tile == 0
                                                               for v in p) for p in self.image_grid_pinpoints),
                 f"image_grid_pinpoints must be (height, width) pairs, multiples of the {tile}-px tile, got "
                 f"{self.image_grid_pinpoints}")

    # --- JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniConfig:
        data = dict(data)
        parts = {
            "decoder": DecoderConfig, "vision": VisionConfig, "audio": AudioConfig,
            "vision_projector": ProjectorConfig, "audio_projector": ProjectorConfig,
        }
        kwargs: dict[str, Any] = {}
        for name, part_cls in parts.items():
            if name in data:
                value = data.pop(name)
                kwargs[name] = None if value is None else _build(part_cls, value, name)
        kwargs.update(_known_fields(cls, data, "config"))
        config = cls(**kwargs)
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> OmniConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


FEATURE_SELECT = ("patches", "full", "drop_first")
LONGROPE_KEYS = ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor")
IMAGE_RESIZE = ("tiles", "shortest_edge", "longest_edge", "native", "anyres", "aria")
IMAGE_PROMPTS = ("run", "grid", "tile_runs", "prefix")
VIDEO_PROMPTS = ("frames", "timestamps")
PROJECTOR_KINDS = ("mlp", "linear", "resampler", "qformer", "aria")
ACTIVATIONS = {"gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu"}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _known_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {where} field(s): {', '.join(unknown)}")
    return data


def _build(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(value).__name__}")
    kwargs = dict(_known_fields(cls, value, where))
    for f in dataclasses.fields(cls):  # JSON has lists where the dataclass has tuples
        if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
            kwargs[f.name] = tuple(kwargs[f.name])
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
