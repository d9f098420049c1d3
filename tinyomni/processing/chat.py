"""Chat messages → one prompt: token ids with media placeholders, plus the media tensors.

Messages are OpenAI-style: `{"role": ..., "content": str | [parts]}` with parts `text`, `image`,
`image_url`, `video`, `audio` and `input_audio`. Each media item becomes a marker in the text, the
chat template (the checkpoint's own jinja, or ChatML) is rendered, and each marker is replaced by
its placeholder run `<img><IMG_CONTEXT>×N</img>` (or the audio equivalent) directly as token ids,
so the counts always match what the encoders will produce. Training and inference both use this.

A media string may be a local path, base64 or a data URL, and a path is read: pass strings from
untrusted clients only after checking them (the server in `tinyomni.serve` decodes them itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyomni.config import OmniConfig
from tinyomni.errors import InputError
from tinyomni.processing.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "image_url", "video", "audio", "input_audio")
MARKER = "<|tinyomni-media-{}|>"
MARKER_RE = re.compile(r"<\|tinyomni-media-(\d+)\|>")


@dataclass
class Prompt:
    """A processed conversation, ready for the model."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [tiles, 3, S, S], every image's and frame's tiles in order
    tiles_per_image: list[int] = field(default_factory=list)
    audio_features: list[torch.Tensor] = field(default_factory=list)  # each [n_mels, frames]


@dataclass
class _Media:
    kind: str  # "image" (one tile set) or "audio"
    tensor: torch.Tensor
    num_tokens: int
    tiles: int = 0


class ChatProcessor:
    """Turns messages into a `Prompt` for one model (its tokenizer, template and media layout)."""

    def __init__(self, tokenizer: Tokenizer, config: OmniConfig, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(self.chat_template)
        except TemplateError as e:
            raise InputError(f"the chat template does not parse: {e}") from None
        names = (config.image_start_token, config.image_end_token, config.image_context_token,
                 config.audio_start_token, config.audio_end_token, config.audio_context_token)
        ids = [tokenizer.token_to_id(n) for n in names]
        if None in ids:
            missing = [n for n, i in zip(names, ids) if i is None]
            raise InputError(f"the tokenizer lacks the media tokens {missing}; add them with "
                             "Tokenizer.add_special_tokens before building the processor")
        (self.image_start_id, self.image_end_id, self.image_context_id,
         self.audio_start_id, self.audio_end_id, self.audio_context_id) = ids

    # --- public ------------------------------------------------------------------------------------
    def __call__(self, messages: list[dict[str, Any]] | str, add_generation_prompt: bool = True,
                 max_tiles: int | None = None) -> Prompt:
        flat, media = self._flatten(messages, max_tiles)
        rendered = self.render(flat, add_generation_prompt)
        return self._prompt(self._prefix_ids() + self._encode(rendered, media), media)

    def training_example(self, messages: list[dict[str, Any]] | str,
                         max_tiles: int | None = None) -> tuple[Prompt, list[int]]:
        """A conversation for training: its `Prompt` and `labels` (one per input id), -100 everywhere
        but the assistant turns, so the loss is on what the model should say.

        The text before each assistant turn is rendered exactly as `__call__` renders a prompt with the
        generation prompt, and tokenized on its own, so the model trains on the very ids it sees at
        inference. Each target is the turn's content plus the template's end-of-turn token.
        """
        flat, media = self._flatten(messages, max_tiles)
        if not any(m["role"] == "assistant" for m in flat):
            raise InputError("a training example needs at least one assistant message to learn from")
        segments: list[tuple[str, bool]] = []  # (text, is_target), in order
        done = ""
        for i, message in enumerate(flat):
            if message["role"] != "assistant":
                continue
            before = self.render(flat[:i], add_generation_prompt=True)
            after = self.render(flat[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise InputError("the chat template does not render a conversation as a prefix of its "
                                 "continuation, so assistant turns cannot be found for training")
            target = after[len(before):]
            # Whitespace after the end-of-turn token is template layout, not something to predict.
            stripped = target.rstrip()
            segments += [(before[len(done):], False), (stripped, True), (target[len(stripped):], False)]
            done = after
        segments.append((self.render(flat, add_generation_prompt=False)[len(done):], False))
        ids = self._prefix_ids()
        labels = [-100] * len(ids)
        for text, is_target in segments:
            piece = self._encode(text, media)
            ids += piece
            labels += piece if is_target else [-100] * len(piece)
        return self._prompt(ids, media), labels

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to text-only messages."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token="", eos_token="")
        except TemplateError as e:
            raise InputError(f"the chat template failed on these messages: {e}") from None

    # --- messages → text with media markers --------------------------------------------------------
    def _flatten(self, messages: list[dict[str, Any]] | str,
                 max_tiles: int | None) -> tuple[list[dict[str, str]], list[_Media]]:
        """Text-only messages (each media item a marker) and the processed media, in order."""
        messages = normalize_messages(messages)
        media: list[_Media] = []
        flat = []
        image_count = sum(1 for m in messages for p in m["content"] if p["type"] in ("image", "image_url"))
        image_number = 0
        for message in messages:
            text = []
            for part in message["content"]:
                kind = part["type"]
                if kind == "text":
                    text.append(part["text"])
                elif kind in ("image", "image_url"):
                    image_number += 1
                    prefix = f"Image-{image_number}: " if image_count > 1 else ""
                    text.append(prefix + self._add_image(part, media, max_tiles) + "\n")
                elif kind == "video":
                    text.append(self._add_video(part, media))
                else:
                    text.append(self._add_audio(part, media) + "\n")
            flat.append({"role": message["role"], "content": "".join(text)})
        return flat, media

    # --- media -------------------------------------------------------------------------------------
    def _require_vision(self) -> None:
        if self.config.vision is None:
            raise InputError("this model has no vision encoder; it cannot take images or video")

    def _add_image(self, part: dict, media: list[_Media], max_tiles: int | None) -> str:
        from tinyomni.processing.image import preprocess_image

        self._require_vision()
        vision = self.config.vision
        source = part["image"] if part["type"] == "image" else _image_url(part)
        tiles = preprocess_image(source, image_size=vision.image_size, min_tiles=self.config.min_tiles,
                                 max_tiles=max_tiles or self.config.max_tiles,
                                 use_thumbnail=self.config.use_thumbnail,
                                 mean=vision.image_mean, std=vision.image_std)
        media.append(_Media("image", tiles, tiles.shape[0] * self.config.image_tokens_per_tile, tiles.shape[0]))
        return MARKER.format(len(media) - 1)

    def _add_video(self, part: dict, media: list[_Media]) -> str:
        from tinyomni.processing.video import preprocess_video, video_prompt_prefixes

        self._require_vision()
        vision = self.config.vision
        frames = preprocess_video(part["video"], num_frames=part.get("num_frames") or self.config.video_frames,
                                  image_size=vision.image_size, mean=vision.image_mean, std=vision.image_std)
        text = []
        for prefix, frame in zip(video_prompt_prefixes(frames.shape[0]), frames):
            media.append(_Media("image", frame[None], self.config.image_tokens_per_tile, 1))
            text.append(prefix + MARKER.format(len(media) - 1) + "\n")
        return "".join(text)

    def _add_audio(self, part: dict, media: list[_Media]) -> str:
        from tinyomni.model.audio import audio_output_length
        from tinyomni.processing.audio import SAMPLE_RATE, check_duration, load_audio, log_mel_spectrogram

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
        samples = load_audio(source)
        max_seconds = audio_config.max_source_positions * 2 * 160 / SAMPLE_RATE
        check_duration(samples, max_seconds)
        features = log_mel_spectrogram(samples, n_mels=audio_config.num_mel_bins)
        media.append(_Media("audio", features, audio_output_length(features.shape[-1], audio_config)))
        return MARKER.format(len(media) - 1)

    # --- tokens ------------------------------------------------------------------------------------
    def _prefix_ids(self) -> list[int]:
        if self.tokenizer.add_bos_token and self.tokenizer.bos_token_id is not None:
            return [self.tokenizer.bos_token_id]
        return []

    def _encode(self, rendered: str, media: list[_Media]) -> list[int]:
        """Rendered text → ids, each media marker replaced by its placeholder run (never adds BOS)."""
        ids: list[int] = []
        pos = 0
        for match in MARKER_RE.finditer(rendered):
            ids += self.tokenizer.encode_piece(rendered[pos:match.start()])
            item = media[int(match.group(1))]
            if item.kind == "image":
                ids += [self.image_start_id] + [self.image_context_id] * item.num_tokens + [self.image_end_id]
            else:
                ids += [self.audio_start_id] + [self.audio_context_id] * item.num_tokens + [self.audio_end_id]
            pos = match.end()
        return ids + self.tokenizer.encode_piece(rendered[pos:])

    @staticmethod
    def _prompt(ids: list[int], media: list[_Media]) -> Prompt:
        images = [m for m in media if m.kind == "image"]
        return Prompt(
            input_ids=ids,
            pixel_values=torch.cat([m.tensor for m in images]) if images else None,
            tiles_per_image=[m.tiles for m in images],
            audio_features=[m.tensor for m in media if m.kind == "audio"],
        )


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
            parts = [{"type": "text", "text": content}]
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
    if kind == "text" and not isinstance(part["text"], str):
        raise InputError(f"message {i} part {j}: 'text' must be a string")
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
