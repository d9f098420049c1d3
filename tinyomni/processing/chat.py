"""Chat messages → one prompt: token ids with media placeholders, plus the media tensors.

Messages are OpenAI-style: `{"role": ..., "content": str | [parts]}` with parts `text`, `image`,
`image_url`, `video`, `audio` and `input_audio`. The chat template (the checkpoint's own jinja, or
ChatML) is rendered with each message's content standing in as a marker; then the template's own
text is tokenized with its control tokens, each message's text is tokenized as plain text (typed
"<|im_start|>" cannot forge a turn), and each media item becomes its placeholder run
`<img><IMG_CONTEXT>×N</img>` (or the audio equivalent) directly as token ids, so the counts always
match what the encoders will produce and no typed text can produce a placeholder. Training and
inference both use this.

A media string may be a local path, base64 or a data URL, and a path is read: pass strings from
untrusted clients only after checking them (the server in `tinyomni.serve` decodes them itself).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyomni.config import OmniConfig
from tinyomni.errors import InputError
from tinyomni.processing.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tinyomni.processing.llava_next import Layout

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "image_url", "video", "audio", "input_audio")
# Stands for message k's content while the template renders; the nonce makes it a string no message
# contains, so a user cannot forge one.
CONTENT_MARKER = "<|tinyomni-{nonce}-content-{k}|>"
# With config.images_in_template: stands for media item k where the template wrote the image token
# (with config.audio_in_template, the audio token too).
IMAGE_MARKER = "<|tinyomni-{nonce}-image-{k}|>"
Content = list  # one message's content: text (str) and media (int: an index into the media list), in order


@dataclass
class Prompt:
    """A processed conversation, ready for the model."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [tiles, 3, S, S], every image's and frame's tiles in order
    # (image_resize "native": [tiles, 3, H, W], each tile padded at the bottom and right with NaN)
    tiles_per_image: list[int] = field(default_factory=list)
    audio_features: list[torch.Tensor] = field(default_factory=list)  # each [n_mels, frames]
    # An instruction-aware Q-Former's input (InstructBLIP): per tile, the prompt's text in its own vocabulary.
    qformer_input_ids: list[list[int]] = field(default_factory=list)
    # image_resize "anyres" (LLaVA-NeXT): per image, its tile grid and the feature window the model keeps
    # (processing/llava_next.py); OmniModel.forward's `image_layouts`.
    image_layouts: list[Layout] = field(default_factory=list)


@dataclass
class _Media:
    kind: str  # "image" (one tile set) or "audio"
    tensor: torch.Tensor
    num_tokens: int
    tiles: int = 0
    grid: tuple[int, int] = (0, 0)  # (rows, columns) of a split image (image_resize "longest_edge"); (0, 0): none
    # A video frame inside a "video" item (not an image part of its own), and a "video" item's text and
    # frames in order (video_prompt "timestamps" with images_in_template: the template places the video).
    in_video: bool = False
    pieces: list[str | int] = field(default_factory=list)
    layout: Layout | None = None  # image_resize "anyres": the image's tile grid


@dataclass
class _Flat:
    """A conversation taken apart for the template: text-only messages whose content is a marker,
    what each marker stands for, the processed media, and the pattern that finds the markers."""

    messages: list[dict[str, str]]
    contents: list[Content]
    media: list[_Media]
    marker: re.Pattern[str]  # either marker; group 1 "content" or "image", group 2 its number
    nonce: str = ""


class ChatProcessor:
    """Turns messages into a `Prompt` for one model (its tokenizer, template and media layout)."""

    def __init__(self, tokenizer: Tokenizer, config: OmniConfig, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag])
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(self.chat_template)
        except TemplateError as e:
            raise InputError(f"the chat template does not parse: {e}") from None
        names = (config.image_start_token, config.image_end_token, config.image_context_token,
                 config.audio_start_token, config.audio_end_token, config.audio_context_token)
        ids = [tokenizer.token_to_id(n) for n in names]
        if config.audio is None:  # no audio tower (e.g. an imported InternVL): its tokens may be absent
            ids[3:] = [-1 if i is None else i for i in ids[3:]]  # -1 matches no token
        if config.vision is None:  # no vision tower (e.g. an imported Qwen2-Audio): the same for images
            ids[:3] = [-1 if i is None else i for i in ids[:3]]
        if not config.image_wrap:  # a bare <image> run (LLaVA): no start and end tokens to find
            ids[:2] = [-1 if i is None else i for i in ids[:2]]
        if None in ids:
            missing = [n for n, i in zip(names, ids) if i is None]
            raise InputError(f"the tokenizer lacks the media tokens {missing}; add them with "
                             "Tokenizer.add_special_tokens before building the processor")
        (self.image_start_id, self.image_end_id, self.image_context_id,
         self.audio_start_id, self.audio_end_id, self.audio_context_id) = ids
        # An instruction-aware Q-Former (InstructBLIP) reads the prompt in its own (BERT) vocabulary.
        self.qformer_tokenizer: Tokenizer | None = None
        if config.vision is not None and config.vision_projector.kind == "qformer" and (
                config.vision_projector.qformer.instruction_aware):
            from tinyomni.processing.instructblip import instruction_tokenizer

            self.qformer_tokenizer = instruction_tokenizer(tokenizer)

    # --- public ------------------------------------------------------------------------------------
    def __call__(self, messages: list[dict[str, Any]] | str, add_generation_prompt: bool = True,
                 max_tiles: int | None = None) -> Prompt:
        flat = self._flatten(messages, max_tiles)
        rendered = self._place_images(self.render(flat.messages, add_generation_prompt), flat)
        self._check_rendered(rendered, flat)
        return self._prompt(self._prefix_ids(flat.media) + self._encode(rendered, flat), flat.media,
                            self._instruction(rendered, flat))

    def training_example(self, messages: list[dict[str, Any]] | str,
                         max_tiles: int | None = None) -> tuple[Prompt, list[int]]:
        """A conversation for training: its `Prompt` and `labels` (one per input id), -100 everywhere
        but the assistant turns, so the loss is on what the model should say.

        The text before each assistant turn is rendered exactly as `__call__` renders a prompt with the
        generation prompt, and tokenized on its own, so the model trains on the very ids it sees at
        inference. Each target is the turn's content plus the template's end-of-turn token.
        """
        conversation = self._flatten(messages, max_tiles)
        flat = conversation.messages
        if not any(m["role"] == "assistant" for m in flat):
            raise InputError("a training example needs at least one assistant message to learn from")
        segments: list[tuple[str, bool]] = []  # (text, is_target), in order
        done = ""
        for i, message in enumerate(flat):
            if message["role"] != "assistant":
                continue
            before = self._place_images(self.render(flat[:i], add_generation_prompt=True), conversation)
            after = self._place_images(self.render(flat[: i + 1], add_generation_prompt=False), conversation)
            if not before.startswith(done) or not after.startswith(before):
                raise InputError("the chat template does not render a conversation as a prefix of its "
                                 "continuation, so assistant turns cannot be found for training")
            target = after[len(before):]
            # Whitespace after the end-of-turn token is template layout, not something to predict.
            stripped = target.rstrip()
            segments += [(before[len(done):], False), (stripped, True), (target[len(stripped):], False)]
            done = after
        whole = self._place_images(self.render(flat, add_generation_prompt=False), conversation)
        self._check_rendered(whole, conversation)
        segments.append((whole[len(done):], False))
        ids = self._prefix_ids(conversation.media)
        labels = [-100] * len(ids)
        for text, is_target in segments:
            piece = self._encode(text, conversation)
            ids += piece
            labels += piece if is_target else [-100] * len(piece)
        instruction = None
        if self.qformer_tokenizer is not None:  # the text before the first answer: what `__call__` gave it then
            first = next(i for i, m in enumerate(flat) if m["role"] == "assistant")
            before = self._place_images(self.render(flat[:first], add_generation_prompt=True), conversation)
            instruction = self._instruction(before, conversation)
        return self._prompt(ids, conversation.media, instruction), labels

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to text-only messages."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token="", eos_token="")
        except TemplateError as e:
            raise InputError(f"the chat template failed on these messages: {e}") from None

    # --- messages → text with media markers --------------------------------------------------------
    def _flatten(self, messages: list[dict[str, Any]] | str, max_tiles: int | None) -> _Flat:
        """Messages for the template (each content a marker), each message's content (text and media
        indices, in order), and the processed media."""
        messages = normalize_messages(messages)
        media: list[_Media] = []
        contents: list[Content] = []
        image_count = sum(1 for m in messages for p in m["content"] if p["type"] in ("image", "image_url"))
        image_number = 0
        in_template = self.config.images_in_template or self.config.audio_in_template
        for message in messages:
            content: Content = []
            for part in message["content"]:
                kind = part["type"]
                if kind == "text":
                    content.append(part["text"])
                elif kind in ("image", "image_url"):
                    image_number += 1
                    if image_count > 1 and self.config.number_images:
                        content.append(f"Image-{image_number}: ")
                    image = self._add_image(part, media, max_tiles)
                    if self.config.image_prompt == "prefix":  # its run starts the prompt (_prefix_ids), not here
                        continue
                    content.append(image)
                    if not self.config.images_in_template:  # else the template writes its own (LLaVA: "<image>\n")
                        content.append("\n")
                elif kind == "video":
                    pieces = self._add_video(part, media)
                    if self.config.images_in_template and self.config.video_prompt == "timestamps":
                        media.append(_Media("video", torch.empty(0), 0, pieces=pieces))  # the template places it
                        content.append(len(media) - 1)
                    else:
                        content += pieces
                else:
                    content.append(self._add_audio(part, media))
                    if not self.config.audio_in_template:  # otherwise the template writes its own
                        content.append("\n")
            contents.append(content)
        typed = "".join(piece for content in contents for piece in content if isinstance(piece, str))
        nonce = secrets.token_hex(8)
        while nonce in typed:  # astronomically rare; a user cannot aim for it
            nonce = secrets.token_hex(8)
        head, tail = CONTENT_MARKER.format(nonce=nonce, k="@").split("content-@")
        marker = re.compile(re.escape(head) + r"(content|image)-(\d+)" + re.escape(tail))
        if in_template:
            # The template sees typed parts, as transformers' processors give them: each text part a
            # marker of its own (numbered in `texts`), each image part {"type": "image"}.
            texts: list[Content] = []
            flat: list[dict[str, Any]] = []
            for m, content in zip(messages, contents):
                parts = []
                for piece in content:
                    kind = None if isinstance(piece, str) else media[piece].kind
                    if kind == "image" and self.config.images_in_template:
                        parts.append({"type": "image"})
                    elif kind == "video":
                        parts.append({"type": "video"})
                    elif kind == "audio" and self.config.audio_in_template:
                        # Qwen2-Audio's template asks `'audio' in content`: the part needs the key.
                        parts.append({"type": "audio", "audio": True})
                    else:  # text, or media the template does not place: a text part of its own
                        parts.append({"type": "text", "text": CONTENT_MARKER.format(nonce=nonce, k=len(texts))})
                        texts.append([piece])
                flat.append({"role": m["role"], "content": parts})
            return _Flat(flat, texts, media, marker, nonce)
        flat = [{"role": m["role"], "content": CONTENT_MARKER.format(nonce=nonce, k=k)}
                for k, m in enumerate(messages)]
        return _Flat(flat, contents, media, marker, nonce)

    # --- media -------------------------------------------------------------------------------------
    def _require_vision(self) -> None:
        if self.config.vision is None:
            raise InputError("this model has no vision encoder; it cannot take images or video")

    def _add_image(self, part: dict, media: list[_Media], max_tiles: int | None) -> int:
        from tinyomni.processing.image import preprocess_image

        self._require_vision()
        vision = self.config.vision
        source = part["image"] if part["type"] == "image" else _image_url(part)
        if self.config.image_resize == "native":  # Idefics2: about its own size, maybe its quarters too
            from tinyomni.processing.idefics2 import preprocess_native_image

            tiles = preprocess_native_image(
                source, self.config.image_shortest_edge or vision.image_size,
                self.config.image_longest_edge or vision.image_size, self.config.image_splitting,
                mean=vision.image_mean, std=vision.image_std)
            media.append(_Media("image", tiles, tiles.shape[0] * self.config.image_tokens_per_tile, tiles.shape[0]))
            return len(media) - 1
        if self.config.image_resize == "anyres":  # LLaVA-NeXT: a grid at the best resolution + the whole image
            from tinyomni.processing.llava_next import preprocess_anyres_image, token_count

            tiles, layout = preprocess_anyres_image(
                source, vision.image_size, vision.grid_size, self.config.image_grid_pinpoints,
                self.config.image_shortest_edge, mean=vision.image_mean, std=vision.image_std)
            media.append(_Media("image", tiles, token_count(layout, self.config.image_tokens_per_tile),
                                tiles.shape[0], layout=layout))
            return len(media) - 1
        if self.config.image_resize == "aria":  # Aria: the longer side to the tile, padded bottom-right
            from tinyomni.processing.aria import preprocess_aria_image

            tiles = preprocess_aria_image(source, vision.image_size, self.config.image_shortest_edge or 1,
                                          mean=vision.image_mean, std=vision.image_std)
            media.append(_Media("image", tiles, self.config.image_tokens_per_tile, 1))
            return len(media) - 1
        if self.config.image_resize == "longest_edge":  # Idefics3 / SmolVLM: split into a grid + global image
            from tinyomni.processing.smolvlm import preprocess_split_image

            tiles, rows, cols = preprocess_split_image(
                source, vision.image_size, self.config.image_longest_edge, self.config.image_splitting,
                mean=vision.image_mean, std=vision.image_std)
            media.append(_Media("image", tiles, tiles.shape[0] * self.config.image_tokens_per_tile, tiles.shape[0],
                                (rows, cols)))
            return len(media) - 1
        tiles = preprocess_image(source, image_size=vision.image_size, min_tiles=self.config.min_tiles,
                                 max_tiles=max_tiles or self.config.max_tiles,
                                 use_thumbnail=self.config.use_thumbnail,
                                 mean=vision.image_mean, std=vision.image_std, resize=self.config.image_resize,
                                 shortest_edge=self.config.image_shortest_edge,
                                 pad_square=self.config.image_pad_to_square)
        media.append(_Media("image", tiles, tiles.shape[0] * self.config.image_tokens_per_tile, tiles.shape[0]))
        return len(media) - 1

    def _add_video(self, part: dict, media: list[_Media]) -> Content:
        """Each sampled frame becomes a one-tile image item; returns the video's text and frames in order
        (config.video_prompt: InternVL's "FrameN: " labels or SmolVLM's timestamps)."""
        from tinyomni.processing.video import (
            frame_tiles,
            load_video,
            smolvlm_frame_indices,
            timestamps_prompt,
            video_prompt_prefixes,
        )

        self._require_vision()
        if self.config.image_resize == "anyres":  # LLaVA-NeXT-Video is a model of its own
            raise InputError("this model (LLaVA-NeXT, image_resize 'anyres') takes images, not video; "
                             "pass the frames as image parts")
        c, vision = self.config, self.config.vision
        num_frames = part.get("num_frames") or c.video_frames
        stamped = c.video_prompt == "timestamps"

        def pick(total: int, fps: float | None) -> list[int]:
            return smolvlm_frame_indices(total, fps, num_frames)

        clip = load_video(part["video"], num_frames, pick=pick if stamped else None)
        longest = (c.image_longest_edge or vision.image_size) if c.image_resize == "longest_edge" else None
        frames = frame_tiles(clip.frames, vision.image_size, vision.image_mean, vision.image_std, longest)
        indices = []
        for frame in frames:
            media.append(_Media("image", frame[None], c.image_tokens_per_tile, 1,
                                in_video=stamped and c.images_in_template))
            indices.append(len(media) - 1)
        if stamped:
            texts = timestamps_prompt(clip, part.get("fps"))
            return [piece for text, k in zip(texts, indices) for piece in (text, k)] + [texts[-1]]
        return [piece for prefix, k in zip(video_prompt_prefixes(len(indices)), indices)
                for piece in (prefix, k, "\n")]

    def _add_audio(self, part: dict, media: list[_Media]) -> int:
        from tinyomni.model.audio import audio_output_length
        from tinyomni.processing.audio import (
            SAMPLE_RATE,
            check_duration,
            chunk_log_mel,
            load_audio,
            log_mel_spectrogram,
        )

        audio_config = self.config.audio
        if audio_config is None:
            raise InputError("this model has no audio encoder; it cannot take audio")
        if part["type"] == "audio":
            source = part["audio"]
        else:
            payload = part.get("input_audio")
            if not isinstance(payload, dict) or "data" not in payload:
                raise InputError("an input_audio part needs {'input_audio': {'data': <base64>, 'format': 'wav'}}")
            source = payload["data"]
        max_seconds = audio_config.max_source_positions * 2 * 160 / SAMPLE_RATE
        samples = load_audio(source, max_seconds=max_seconds)  # a long clip is refused before its decode
        check_duration(samples, max_seconds)
        if audio_config.pad_to_chunk:  # Qwen2-Audio: the features of the clip padded to 30 s
            features, frames = chunk_log_mel(samples, n_mels=audio_config.num_mel_bins)
        else:
            features = log_mel_spectrogram(samples, n_mels=audio_config.num_mel_bins)
            frames = features.shape[-1]
        tokens = audio_output_length(frames, audio_config)
        if tokens < 1:
            raise InputError(f"audio clip of {len(samples) / SAMPLE_RATE * 1000:.0f} ms is too short for this "
                             "model's audio encoder (it gives no embeddings)")
        media.append(_Media("audio", features, tokens))
        return len(media) - 1

    # --- tokens ------------------------------------------------------------------------------------
    def _prefix_ids(self, media: list[_Media]) -> list[int]:
        """BOS (when the tokenizer adds one), after every image's run with image_prompt "prefix"."""
        ids = []
        if self.config.image_prompt == "prefix":  # BLIP-2 / InstructBLIP: the query tokens come first
            ids = [self.image_context_id] * sum(m.num_tokens for m in media if m.kind == "image")
        if self.tokenizer.add_bos_token and self.tokenizer.bos_token_id is not None:
            return ids + [self.tokenizer.bos_token_id]
        return ids

    def _instruction(self, rendered: str, flat: _Flat) -> list[int] | None:
        """An instruction-aware Q-Former's ids: the rendered prompt's text (media left out), in its vocabulary."""
        if self.qformer_tokenizer is None or not any(m.kind == "image" for m in flat.media):
            return None
        from tinyomni.processing.instructblip import instruction_ids

        def text(match: re.Match[str]) -> str:
            if match.group(1) == "image":
                return ""
            return "".join(p for p in flat.contents[int(match.group(2))] if isinstance(p, str))

        return instruction_ids(self.qformer_tokenizer, flat.marker.sub(text, rendered))

    def _place_images(self, rendered: str, flat: _Flat) -> str:
        """With images_in_template: the k-th image token the template wrote → the k-th image's marker
        (with audio_in_template the same for audio). (Only the template's own text is in `rendered`;
        typed text is behind content markers.)"""
        for kind, token in self._kinds_in_template():
            items = iter([k for k, m in enumerate(flat.media) if m.kind == kind and not m.in_video])

            def place(match: re.Match[str], items=items) -> str:
                k = next(items, None)  # more tokens than items: left as they are, for _check_rendered
                return match.group(0) if k is None else IMAGE_MARKER.format(nonce=flat.nonce, k=k)

            rendered = re.sub(re.escape(token), place, rendered)
        return rendered

    def _kinds_in_template(self) -> list[tuple[str, str]]:
        """(media kind, its context token) for each kind whose placeholder the template writes."""
        c = self.config
        videos = c.images_in_template and c.video_prompt == "timestamps"
        return ([("image", c.image_context_token)] if c.images_in_template else []) + (
            [("video", c.video_token)] if videos else []) + (
            [("audio", c.audio_context_token)] if c.audio_in_template else [])

    def _check_rendered(self, rendered: str, flat: _Flat) -> None:
        """Each message with media must appear exactly once in the rendered template (with
        images_in_template / audio_in_template: the template must write one image / audio token per
        image / clip)."""
        kinds = self._kinds_in_template()
        for kind, token in kinds:
            placed = sum(1 for m in flat.marker.finditer(rendered)
                         if m.group(1) == "image" and flat.media[int(m.group(2))].kind == kind)
            written = placed + rendered.count(token)
            items = sum(1 for m in flat.media if m.kind == kind and not m.in_video)
            if written != items:
                raise InputError(f"the chat template writes {written} {kind} token(s) ({token}) for "
                                 f"{items} {kind} item(s)")
        if kinds:
            return
        seen = [int(m.group(2)) for m in flat.marker.finditer(rendered) if m.group(1) == "content"]
        for k, content in enumerate(flat.contents):
            if any(isinstance(p, int) for p in content) and seen.count(k) != 1:
                raise InputError(f"the chat template renders message {k} {seen.count(k)} times; a message "
                                 "with images or audio must appear exactly once")

    def _encode(self, rendered: str, flat: _Flat) -> list[int]:
        """Rendered text (with content markers) → ids (never adds BOS). The template's text keeps its
        control tokens; the messages' text is plain text; media become their placeholder runs."""
        ids: list[int] = []
        run: list[tuple[str, bool]] = []  # (text, typed by a user) since the last media item
        pos = 0
        for match in flat.marker.finditer(rendered):
            run.append((rendered[pos:match.start()], False))
            number = int(match.group(2))
            pieces = flat.contents[number] if match.group(1) == "content" else [number]
            for piece, typed in self._expand_videos(pieces, flat.media):
                if isinstance(piece, str):
                    run.append((piece, typed))
                    continue
                ids += self._encode_run(run, after=ids[-1] if ids else None)
                run = []
                placeholder = self._placeholder(flat.media[piece])
                if self.config.image_prompt == "tile_runs" and ids[-1:] == placeholder[:1] == [self.image_start_id]:
                    placeholder = placeholder[1:]  # Idefics2Processor: images side by side share the one between
                ids += placeholder
            pos = match.end()
        run.append((rendered[pos:], False))
        return ids + self._encode_run(run, after=ids[-1] if ids else None)

    @staticmethod
    def _expand_videos(pieces: Content, media: list[_Media]) -> list[tuple[str | int, bool]]:
        """(piece, typed by a user) for each piece, a "video" item replaced by its own text (the
        processor's, not the user's) and frames."""
        out: list[tuple[str | int, bool]] = []
        for piece in pieces:
            if isinstance(piece, int) and media[piece].kind == "video":
                out += [(p, False) for p in media[piece].pieces]
            else:
                out.append((piece, True))
        return out

    def _placeholder(self, item: _Media) -> list[int]:
        """A media item's run of context tokens, wrapped in its start and end tokens (images: unless
        config.image_wrap is off)."""
        if item.kind == "image" and self.config.image_prompt == "grid":
            return self._grid_placeholder(item)
        if item.kind == "image" and self.config.image_prompt == "prefix":  # its run is at the start (_prefix_ids)
            return []
        if item.kind == "image" and self.config.image_prompt == "tile_runs":  # Idefics2
            from tinyomni.processing.idefics2 import tile_runs_ids

            return tile_runs_ids(item.tiles, self.config.image_tokens_per_tile, self.image_start_id,
                                 self.image_context_id)
        if item.kind == "image":
            run = [self.image_context_id] * item.num_tokens
            return [self.image_start_id, *run, self.image_end_id] if self.config.image_wrap else run
        if self.config.audio_in_template:  # the template wrote the start and end tokens
            return [self.audio_context_id] * item.num_tokens
        return [self.audio_start_id] + [self.audio_context_id] * item.num_tokens + [self.audio_end_id]

    def _grid_placeholder(self, item: _Media) -> list[int]:
        """config.image_prompt "grid" (Idefics3 / SmolVLM): the processor's text for the image, tokenized
        on its own. It starts and ends with image_start_token, a special token, so BPE merges nothing
        across its edges and these are the ids the processor's whole prompt has there."""
        from tinyomni.processing.smolvlm import image_prompt

        c = self.config
        rows, cols = item.grid
        text = image_prompt(rows, cols, c.image_tokens_per_tile, c.image_start_token, c.image_context_token,
                            c.image_global_token)
        ids = self.tokenizer.encode_piece(text)
        if ids.count(self.image_context_id) != item.num_tokens:  # the tokenizer must hold the tokens whole
            raise InputError(f"the image prompt has {ids.count(self.image_context_id)} {c.image_context_token} "
                             f"tokens for {item.num_tokens} image embeddings")
        return ids

    def _encode_run(self, run: list[tuple[str, bool]], after: int | None = None) -> list[int]:
        """Template and user text between two media items. Encoded whole (the ids transformers gets
        from the same rendered string), unless a control token would come from the user's text: then
        the user's pieces are encoded apart, as plain text.

        `after` is the placeholder token just before the run. The run is encoded behind it, and it is
        dropped again, because that is how the run's text sits in the whole prompt transformers
        tokenizes: a SentencePiece-style pre-tokenizer (Metaspace with prepend_scheme "first", as newer
        Llama-2 tokenizer.json files have it) writes a "▁" before text that starts the input, not before
        text that follows a special token; encoded alone, the run would gain that "▁". (Llama-2's legacy
        "Prepend ▁" normalizer writes one in both places, so it is unaffected; so are byte-level BPEs.)
        """
        text = "".join(t for t, _ in run)
        if not text:
            return []
        if self.config.image_prompt == "tile_runs" and after == self.image_start_id and not re.match(r"[\s<]", text):
            run, text = [(" ", False), *run], " " + text  # Idefics2Processor: a word after an image is spaced
        backend = self.tokenizer.backend
        context = backend.id_to_token(after) if after is not None and after >= 0 else None
        encoding = backend.encode(context + text, add_special_tokens=False) if context else None
        skip = 1 if encoding is not None and encoding.ids[:1] == [after] else 0  # the context token came back whole
        if not skip:  # no media before the run (or a token that does not encode to itself): the run alone
            encoding, context = backend.encode(text, add_special_tokens=False), ""
        spans, at = [], len(context or "")  # offsets count from the start of the encoded string
        for piece, typed in run:
            if typed and piece:
                spans.append((at, at + len(piece)))
            at += len(piece)
        special = self.tokenizer.special_ids
        forged = any(token in special and start < end_ and stop > begin
                     for token, (start, stop) in zip(encoding.ids[skip:], encoding.offsets[skip:])
                     for begin, end_ in spans)
        if not forged:
            return encoding.ids[skip:]
        ids: list[int] = []
        for piece, typed in run:
            ids += self.tokenizer.encode_as_text(piece) if typed else self.tokenizer.encode_piece(piece)
        return ids

    @staticmethod
    def _prompt(ids: list[int], media: list[_Media], instruction: list[int] | None = None) -> Prompt:
        images = [m for m in media if m.kind == "image"]
        return Prompt(
            input_ids=ids,
            pixel_values=stack_tiles([m.tensor for m in images]) if images else None,
            tiles_per_image=[m.tiles for m in images],
            audio_features=[m.tensor for m in media if m.kind == "audio"],
            qformer_input_ids=[list(instruction) for m in images for _ in range(m.tiles)] if instruction else [],
            image_layouts=[m.layout for m in images if m.layout is not None],
        )


def stack_tiles(tiles: list[torch.Tensor]) -> torch.Tensor:
    """Every image's tiles in one tensor; tiles of several sizes (image_resize "native") padded together.
    (Batches of several prompts join their pixels the same way.)"""
    if len({t.shape[-2:] for t in tiles}) > 1:
        from tinyomni.processing.idefics2 import pad_tiles

        return pad_tiles(tiles)
    return torch.cat(tiles)


def normalize_messages(messages: list[dict[str, Any]] | str) -> list[dict[str, Any]]:
    """Validate messages and give every one a list of typed parts. Errors name the message and part."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise InputError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            parts = [_normalize_part({"type": "text", "text": content}, i, 0)]
        elif isinstance(content, list):
            parts = [_normalize_part(p, i, j) for j, p in enumerate(content)]
        else:
            raise InputError(f"message {i} content must be a string or a list of parts")
        out.append({"role": role, "content": parts})
    return out


def _normalize_part(part: Any, i: int, j: int) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or "type" not in part:
        raise InputError(f"message {i} part {j} must be a dict with a 'type'")
    kind = part["type"]
    if kind not in PART_TYPES:
        raise InputError(f"message {i} part {j} has unknown type {kind!r}; "
                         f"supported: {', '.join(PART_TYPES)}")
    if part.get(kind) is None:  # OpenAI's convention: the payload sits under the type's own name
        raise InputError(f"message {i} part {j} of type {kind!r} has no {kind!r} field")
    if kind == "text":
        if not isinstance(part["text"], str):
            raise InputError(f"message {i} part {j}: 'text' must be a string")
        try:
            part["text"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (e.g. "\ud800" in JSON) is no character
            raise InputError(f"message {i} part {j}: the text is not valid Unicode (a lone surrogate "
                             f"{part['text'][e.start]!r} at position {e.start})") from None
    return part


def _image_url(part: dict) -> Any:
    value = part["image_url"]
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise InputError("an image_url part needs {'image_url': {'url': <data URL or path>}}")
    if url.startswith(("http://", "https://")):
        raise InputError("image URLs are not fetched by the model (no network access); "
                         "download the image and pass a path or a data URL")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


class _GenerationTag(Extension):
    """transformers' `{% generation %}…{% endgeneration %}` (it marks assistant text, e.g. in LLaVA's
    template): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()
