"""An OpenAI-compatible HTTP server (FastAPI) in front of the continuous-batching engine.

    POST /v1/chat/completions   messages with text, image_url and input_audio parts; SSE streaming
    GET  /v1/models             the one model this server holds
    GET  /health                liveness and engine load (no API key needed)
    GET  /                      the web chat page (static files, no external assets)

Everything a client sends is checked here before the model sees it: the body size, the JSON, the
sampling fields, every content part, image URLs (fetched only from allowed hosts), local paths (only
under allowed directories), image pixels, the number of media items, audio seconds and max_tokens.
Each refusal is a 4xx with OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`,
whose code and message name the limit and the option that sets it. The core (`tinyomni.processing`)
never sees a client's path or URL: the server hands it decoded images and audio samples.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyomni.api import Model
from tinyomni.errors import ContextLengthError, InputError
from tinyomni.generate import SamplingError, SamplingParams
from tinyomni.processing.audio import SAMPLE_RATE, AudioTooLongError, load_audio
from tinyomni.processing.image import load_image
from tinyomni.serve.engine import Engine, EngineClosedError, EngineFailedError, QueueFullError
from tinyomni.serve.engine import Request as EngineRequest

log = logging.getLogger("tinyomni.serve")
STATIC_DIR = Path(__file__).parent / "static"
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "oga", "opus", "webm", "weba", "m4a", "mp4", "aac")
T = TypeVar("T")


@dataclass
class ServerOptions:
    """What the server accepts; each field is a `tinyomni serve` option of the same name."""

    model_name: str | None = None  # the id clients pass as `model` (default: the model's own name)
    api_key: str | None = None  # when set, every /v1 endpoint needs `Authorization: Bearer <key>`
    allow_hosts: list[str] = field(default_factory=list)  # "host[:port]" image URLs may come from ("*.x.org")
    allow_dirs: list[Path] = field(default_factory=list)  # directories local image paths may be under
    max_body_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 25_000_000  # width × height of one image, checked before decoding
    max_tiles: int | None = None  # tiles per image (None: the model's own maximum)
    max_media_items: int = 8  # images + audio clips in one request
    max_audio_seconds: float = 30.0  # per clip
    max_tokens: int = 1024  # the largest max_tokens a request may ask for, and the default
    # Defaults when a request gives none; None: the model's generation_config.json, else OpenAI's (1.0).
    temperature: float | None = None
    top_p: float | None = None
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting for a row; beyond that the server answers 503
    max_context: int | None = 2048  # cache slots per row (None: the model's context length)
    fetch_timeout: float = 10.0  # seconds for fetching one image URL, redirects and all


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param, self.type, self.headers)


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   type: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# Limits whose `tinyomni serve` option is not simply the field's name in dashes.
LIMIT_OPTIONS = {"max_body_bytes": "--max-body-mb"}


def limit_error(limit: str, message: str, param: str | None = None, status: int = 400) -> APIError:
    """A request over one of the server's limits: the code is the limit, the message names its option."""
    option = LIMIT_OPTIONS.get(limit, "--" + limit.replace("_", "-"))
    return APIError(status, f"{message} (server limit {limit}; set with `tinyomni serve {option}`)",
                    code=f"{limit}_exceeded", param=param)


# --- the request body ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Any] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    # Extensions that vLLM and llama-server accept too.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = ChatRequest.model_validate(data)
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply", code="invalid_json") from None
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}", code="invalid_value", param=param) from None
    if request.n != 1:
        raise APIError(400, "n must be 1: this server returns one choice per request", param="n")
    if request.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if request.tools:
        raise APIError(400, "tools (function calling) are not supported by this server", param="tools")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    return request


def sampling_params(request: ChatRequest, options: ServerOptions, model: Model) -> SamplingParams:
    """The request's sampling fields over the server's and the model's defaults, validated in the one
    place every front end uses (Model.sampling_params); a bad value is a 400 naming the field."""
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > options.max_tokens:
        which = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise limit_error("max_tokens", f"{which} is {max_tokens}; this server allows at most "
                          f"{options.max_tokens}", param=which)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
    defaults = model.generation_defaults
    try:
        return model.sampling_params(
            max_new_tokens=max_tokens or min(defaults.get("max_new_tokens", options.max_tokens), options.max_tokens),
            temperature=first(request.temperature, options.temperature, defaults.get("temperature"), 1.0),
            top_p=first(request.top_p, options.top_p, defaults.get("top_p"), 1.0),
            top_k=request.top_k, repetition_penalty=request.repetition_penalty, seed=request.seed, stop=stop)
    except SamplingError as e:
        raise APIError(400, str(e), code="invalid_value", param=e.field) from None


def first(*values: T | None) -> T | None:
    return next((v for v in values if v is not None), None)


# --- messages and media ----------------------------------------------------------------------------
class MediaResolver:
    """Turns OpenAI messages into core messages whose media are already decoded and within limits."""

    def __init__(self, options: ServerOptions, client: httpx.AsyncClient, model: Model) -> None:
        self.options = options
        self.client = client
        self.allow_dirs = [Path(d).expanduser().resolve() for d in options.allow_dirs]
        audio = model.config.audio
        model_seconds = audio.max_source_positions * 2 * 160 / SAMPLE_RATE if audio else 0.0
        self.max_audio_seconds = min(options.max_audio_seconds, model_seconds) if audio else 0.0

    async def resolve(self, messages: list[Any]) -> list[dict[str, Any]]:
        checked = [self._check_message(m, i) for i, m in enumerate(messages)]
        media = [(i, j) for i, m in enumerate(checked) for j, p in enumerate(m["content"])
                 if p["type"] != "text"]
        if len(media) > self.options.max_media_items:
            raise limit_error("max_media_items", f"the request has {len(media)} media items (images and "
                              f"audio); this server allows at most {self.options.max_media_items}",
                              param="messages")
        # Decode every item concurrently (fetches overlap; decoding runs in worker threads).
        decoded = await asyncio.gather(*(self._resolve_part(checked[i]["content"][j], i, j)
                                         for i, j in media))
        for (i, j), part in zip(media, decoded):
            checked[i]["content"][j] = part
        return checked

    def _check_message(self, message: Any, i: int) -> dict[str, Any]:
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role {role!r} is not supported; use system, user or assistant",
                           param=f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            return {"role": role, "content": [{"type": "text", "text": content}]}
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts",
                           param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{at}.text must be a string", param=f"{at}.text")
            elif kind in ("image_url", "input_audio"):
                if role != "user":
                    raise APIError(400, f"{at}: only user messages may carry images or audio", param=at)
            elif not isinstance(part, dict):
                raise APIError(400, f"{at} must be an object with a 'type'", param=at)
            else:
                raise APIError(400, f"{at} has unknown type {kind!r}; supported: text, image_url, "
                               "input_audio", code="unknown_part_type", param=f"{at}.type")
            parts.append(part)
        return {"role": role, "content": parts}

    async def _resolve_part(self, part: dict[str, Any], i: int, j: int) -> dict[str, Any]:
        at = f"messages[{i}].content[{j}]"
        try:
            if part["type"] == "image_url":
                return {"type": "image", "image": await self._image(part, at)}
            return {"type": "audio", "audio": (await self._audio(part, at), SAMPLE_RATE)}
        except InputError as e:  # corrupt or undecodable media, as the core reports it
            raise APIError(400, f"{at}: {e}", code="invalid_media", param=at) from None

    # images
    async def _image(self, part: dict[str, Any], at: str) -> Image.Image:
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{at}.image_url must be {{'url': <data URL, http(s) URL or path>}}",
                           param=f"{at}.image_url")
        if url.startswith("data:"):
            source: bytes | Path = data_url_bytes(url, f"{at}.image_url.url")
        elif url.startswith(("http://", "https://")):
            source = await self._fetch(url, f"{at}.image_url.url")
        else:
            source = self._local_path(url, f"{at}.image_url.url")
        return await asyncio.to_thread(self._decode_image, source, f"{at}.image_url.url")

    def _decode_image(self, source: bytes | Path, param: str) -> Image.Image:
        limit = self.options.max_image_pixels
        # The header alone gives the size: refuse a huge image before decoding its pixels.
        width = height = 0
        with contextlib.suppress(Exception):  # unreadable files get load_image's precise message below
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as header:
                width, height = header.size
        if width * height > limit:
            raise limit_error("max_image_pixels", f"the image is {width}x{height} = {width * height:,} "
                              f"pixels; this server allows at most {limit:,}", param=param)
        return load_image(source, max_pixels=limit)

    async def _fetch(self, url: str, param: str) -> bytes:
        """GET an image from an allowed host and port, following at most 3 redirects (each one
        re-checked), all within one deadline: a slow host cannot hold a request past it."""
        timeout = self.options.fetch_timeout
        try:
            return await asyncio.wait_for(self._fetch_within_deadline(url, param), timeout)
        except asyncio.TimeoutError:
            raise APIError(400, f"fetching {url} took longer than {timeout:g} s (set with "
                           "`tinyomni serve --fetch-timeout`)", code="fetch_failed", param=param) from None

    async def _fetch_within_deadline(self, url: str, param: str) -> bytes:
        limit = self.options.max_body_bytes
        for _ in range(4):
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise APIError(400, f"{url} has an invalid port", code="fetch_failed", param=param) from None
            if not host_allowed(host, port, parts.scheme, self.options.allow_hosts):
                allowed = ", ".join(self.options.allow_hosts) or "none"
                raise APIError(400, f"image URLs from {host}:{port} are not allowed (allowed hosts: "
                               f"{allowed}; set with `tinyomni serve --allow-host HOST[:PORT]`)",
                               code="url_not_allowed", param=param)
            try:
                async with self.client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise APIError(400, f"fetching {url} answered HTTP {response.status_code}",
                                       code="fetch_failed", param=param)
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise limit_error("max_body_bytes", f"the image at {url} is larger than "
                                              f"{limit:,} bytes", param=param)
                    return bytes(data)
            except httpx.HTTPError as e:
                raise APIError(400, f"could not fetch {url}: {type(e).__name__}: {e}", code="fetch_failed",
                               param=param) from None
        raise APIError(400, f"too many redirects fetching {url}", code="fetch_failed", param=param)

    def _local_path(self, url: str, param: str) -> Path:
        if not self.allow_dirs:
            raise APIError(400, "image_url must be a data: URL or an http(s) URL; local paths are not "
                           "allowed (start the server with `--allow-dir DIR` to allow files under DIR)",
                           code="path_not_allowed", param=param)
        path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
        candidates = [path] if path.is_absolute() else [d / path for d in self.allow_dirs]
        for candidate in candidates:
            try:
                resolved = candidate.resolve()  # follows symlinks: a link out of the directory is refused
            except (OSError, RuntimeError, ValueError):
                continue
            if any(resolved.is_relative_to(d) for d in self.allow_dirs):
                if not resolved.is_file():
                    raise APIError(400, f"no such image file: {url}", code="invalid_media", param=param)
                return resolved
        raise APIError(400, f"{url} is not under an allowed directory "
                       f"({', '.join(map(str, self.allow_dirs))}; set with `--allow-dir`)",
                       code="path_not_allowed", param=param)

    # audio
    async def _audio(self, part: dict[str, Any], at: str) -> np.ndarray:
        if self.max_audio_seconds == 0:
            raise APIError(400, f"{at}: this model has no audio encoder", param=at)
        payload = part.get("input_audio")
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
            raise APIError(400, f"{at}.input_audio must be {{'data': <base64>, 'format': 'wav'}}",
                           param=f"{at}.input_audio")
        fmt = payload.get("format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
            raise APIError(400, f"{at}.input_audio.format {fmt!r} is not supported; use one of "
                           f"{', '.join(AUDIO_FORMATS)}", param=f"{at}.input_audio.format")
        data = payload["data"]
        param = f"{at}.input_audio.data"
        raw = data_url_bytes(data, param) if data.startswith("data:") else b64decode(data, param)
        # Bytes only: the core would also read a path, which a client must never name. The length is
        # checked from the header (or by stopping the decode), so a long clip costs no full decode.
        try:
            return await asyncio.to_thread(load_audio, raw, None, self.max_audio_seconds)
        except AudioTooLongError as e:
            length = f"{e.seconds:.1f} s" if e.seconds is not None else f"longer than {e.max_seconds:g} s"
            raise limit_error("max_audio_seconds", f"the audio clip is {length}; this server allows at most "
                              f"{self.max_audio_seconds:g} s per clip", param=param) from None


def b64decode(text: str, param: str) -> bytes:
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_" if "-" in compact or
                                "_" in compact else None, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", code="invalid_base64", param=param) from None
    if not data:
        raise APIError(400, f"{param} is empty", code="invalid_media", param=param)
    return data


def data_url_bytes(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or ";base64" not in header:
        raise APIError(400, f"{param}: a data URL must look like data:<type>;base64,<data>",
                       code="invalid_data_url", param=param)
    return b64decode(payload, param)


def host_allowed(host: str, port: int, scheme: str, patterns: list[str]) -> bool:
    """Whether `--allow-host` patterns allow host:port. "example.org" (or "*.example.org" for its
    subdomains) allows the scheme's own port only (80 for http, 443 for https); "example.org:8080"
    allows that port."""
    for pattern in patterns:
        name, _, allowed_port = pattern.lower().rpartition(":") if ":" in pattern else (pattern.lower(), "", "")
        wanted = int(allowed_port) if allowed_port.isdigit() else (443 if scheme == "https" else 80)
        if port != wanted:
            continue
        if host == name or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


# --- responses -------------------------------------------------------------------------------------
def completion_body(id: str, created: int, model: str, text: str, reason: str, usage: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": reason}],
            "usage": usage, "system_fingerprint": None}


def usage_of(request: EngineRequest) -> dict[str, int]:
    c = request.completion
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (not after buffering it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise limit_error("max_body_bytes", f"the request body is {int(declared):,} bytes; this server "
                          f"accepts at most {limit:,}", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise limit_error("max_body_bytes", f"the request body is over {limit:,} bytes", status=413)
    return bytes(body)


class ClientGone(Exception):
    """The client closed the connection while we were still working for it."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, unless the client disconnects first: then cancel it and raise ClientGone."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()


def engine_error(e: Exception) -> APIError:
    """The HTTP answer for an error from preparing or generating: 4xx when the request caused it, 503
    when the server cannot take it, else 500 with an id to find the traceback in the log (never in
    the body)."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, SamplingError):
        return APIError(400, str(e), code="invalid_value", param=e.field)
    if isinstance(e, InputError):
        return APIError(400, str(e), code="invalid_request", param="messages")
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="server_busy", type="server_error", headers={"Retry-After": "1"})
    if isinstance(e, EngineFailedError):
        return APIError(503, str(e), code="engine_failed", type="server_error")
    if isinstance(e, EngineClosedError):
        return APIError(503, str(e), code="server_shutting_down", type="server_error")
    return internal_error_of(e, "generation failed")


def internal_error_of(e: BaseException, what: str) -> APIError:
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", what, error_id, exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__}); error id {error_id} is in the "
                    "server's log", code="internal_error", type="server_error")


# --- the app ---------------------------------------------------------------------------------------
def create_app(model: Model, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app for one model. The engine starts and stops with the app's lifespan."""
    options = options or ServerOptions()
    name = options.model_name or Path(str(model.name)).name or "model"
    engine = Engine(model, max_batch=options.max_batch, max_context=options.max_context,
                    max_queue=options.max_queue)
    created = int(time.time())
    max_tiles = options.max_tiles
    if max_tiles is not None:
        max_tiles = max(1, min(max_tiles, model.config.max_tiles))
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        # trust_env=False: no proxy from the environment; redirects are followed by hand (re-checked).
        async with httpx.AsyncClient(timeout=options.fetch_timeout, follow_redirects=False,
                                     trust_env=False) as client:
            state["media"] = MediaResolver(options, client, model)
            try:
                yield
            finally:
                engine.close()

    app = FastAPI(title="tinyomni", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.options = options

    # Every failure, ours or the framework's (404, 405, ...), answers in OpenAI's error shape.
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, str(e.errors()[:1]), code="invalid_value")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        return internal_error_of(e, "unhandled error").response()

    async def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           type="authentication_error")
        if not secrets.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", type="authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tinyomni",
                "max_context": engine.max_context}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"model {model_id!r} not found; this server has {name!r}",
                           code="model_not_found", param="model")
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await read_body(request, options.max_body_bytes))
        if chat.model is not None and chat.model != name:
            raise APIError(404, f"model {chat.model!r} not found; this server has {name!r}",
                           code="model_not_found", param="model")
        params = sampling_params(chat, options, model)
        messages = await state["media"].resolve(chat.messages)
        try:
            prompt = await asyncio.to_thread(model.prepare, messages, max_tiles)
            job = engine.submit(prompt, params, loop=asyncio.get_running_loop())
        except Exception as e:
            raise engine_error(e) from None
        try:
            # Wait for the prefill, so a failure there is still an HTTP error, not a broken stream.
            await unless_disconnected(request, job.next_event())
        except ClientGone:
            job.cancel()
            return Response(status_code=499)
        except Exception as e:
            job.cancel()
            raise engine_error(e) from None
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(stream_chunks(job, reply_id, now, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> str:
            return "".join([delta async for delta in job.deltas()])

        try:
            text = await unless_disconnected(request, collect())
        except ClientGone:
            job.cancel()
            return Response(status_code=499)
        except Exception as e:
            job.cancel()
            raise engine_error(e) from None
        return JSONResponse(completion_body(reply_id, now, name, text, job.completion.finish_reason,
                                            usage_of(job)))

    async def stream_chunks(job: EngineRequest, reply_id: str, now: int,
                            include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> dict:
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": now, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return body

        try:
            yield sse(chunk({"role": "assistant", "content": ""}))
            async for delta in job.deltas():
                yield sse(chunk({"content": delta}))
            yield sse(chunk({}, job.completion.finish_reason))
            if include_usage:
                yield sse({"id": reply_id, "object": "chat.completion.chunk", "created": now, "model": name,
                           "system_fingerprint": None, "choices": [], "usage": usage_of(job)})
            yield sse("[DONE]")
        except Exception as e:  # headers are sent: report the failure inside the stream
            error = engine_error(e)
            yield sse({"error": {"message": error.message, "type": error.type, "param": None,
                                 "code": error.code}})
        finally:
            # A client that disconnected mid-stream lands here (the task is cancelled): free its row.
            job.cancel()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.failure is not None:  # a supervisor should restart us; the CLI exits non-zero too
            return JSONResponse({"status": "failed", "model": name, "error": type(engine.failure).__name__,
                                 **engine.stats()}, status_code=503)
        return JSONResponse({"status": "ok", "model": name, **engine.stats()})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

