"""The OpenAI-compatible server, driven by the official `openai` client on a loopback port.

Answers are checked token for token against the core's own generation on an identical model, so
"correct" means exactly what `Model.complete` says, batching and HTTP notwithstanding.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.server
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
from serve_support import (
    b64,
    data_url,
    encoded_audio,
    png_bytes,
    running_server,
    torch_threads,
    varied_tiny_model,
    wav_bytes,
)

from tinyomni.serve import cli
from tinyomni.serve.server import ServerOptions

KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def reference():
    """A second copy of the served model (same seed, same weights) for expected answers: the served
    one belongs to the server's engine thread."""
    with torch_threads(1):
        yield varied_tiny_model()


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(png_bytes((200, 30, 30)))
    (root / "secret.png").write_bytes(png_bytes((0, 0, 0)))
    (allowed / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def image_host():
    """A plain HTTP server on 127.0.0.1 serving one PNG, for image URLs on an allowed host."""
    body = png_bytes((30, 30, 200))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            if self.path == "/blue.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://localhost.invalid/blue.png")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()


@pytest.fixture(scope="module")
def server(images_dir, image_host):
    options = ServerOptions(model_name=MODEL, api_key=KEY, allow_hosts=[image_host[0].removeprefix("http://")],
                            allow_dirs=[images_dir / "allowed"], max_body_bytes=2_000_000,
                            max_image_pixels=1_000_000, max_media_items=3, max_audio_seconds=5,
                            max_tokens=2000, max_batch=8, max_queue=16)
    with torch_threads(1), running_server(varied_tiny_model(), options) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(t):
    return {"type": "text", "text": t}


def image(data: bytes):
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def audio(data: bytes, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def as_core(messages):
    """The same conversation as the core's own part types, for the reference answer."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": base64.b64decode(p["image_url"]["url"].split(",")[1])}
                       if p["type"] == "image_url" else
                       {"type": "audio", "audio": base64.b64decode(p["input_audio"]["data"])}
                       if p["type"] == "input_audio" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


CASES = {
    "text": [{"role": "user", "content": "Hello! How are you?"}],
    "image": user(image(png_bytes((200, 30, 30))), text("What colour is this?")),
    "audio": user(audio(wav_bytes(0.8)), text("What did you hear?")),
    "two_images": user(image(png_bytes((10, 200, 30), (80, 40))), image(png_bytes((10, 30, 200), (40, 80))),
                       text("Which is wider?")),
    "image_and_audio": user(image(png_bytes((90, 90, 90))), audio(wav_bytes(0.4)), text("Describe both.")),
    "mp3": user(audio(encoded_audio("mp3"), "mp3"), text("Transcribe.")),
    "flac": user(audio(encoded_audio("flac"), "flac"), text("Transcribe.")),
    "webm": user(audio(encoded_audio("webm"), "webm"), text("Transcribe.")),
    "multi_turn": [{"role": "system", "content": "Be brief."},
                   *user(image(png_bytes((200, 200, 30))), text("Describe it.")),
                   {"role": "assistant", "content": "A yellow square."},
                   {"role": "user", "content": [text("And its colour again?")]}],
}


# --- the API as a client sees it ---------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("case", list(CASES))
def test_completion_matches_the_core(client, reference, case):
    messages = CASES[case]
    want = reference.complete(as_core(messages), max_new_tokens=12)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    assert r.model == MODEL and r.object == "chat.completion"


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_matches_the_core(client, reference, case):
    messages = CASES[case]
    want = reference.complete(as_core(messages), max_new_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_no_usage_unless_asked(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_sampling_fields(client, reference):
    messages = [{"role": "user", "content": "Tell me something."}]
    first, second = (client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                    temperature=1.0, top_p=0.9, seed=7) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content
    want = reference.complete(messages, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert first.choices[0].message.content == want.text
    # stop strings and max_completion_tokens
    full = reference.complete(messages, max_new_tokens=16)
    stop = full.text[len(full.text) // 2:][:3]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16,
                                       temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content
    assert full.text.startswith(r.choices[0].message.content)


def test_image_from_allowed_dir_and_host(client, reference, image_host, images_dir):
    host, blue = image_host
    for url, data in [(f"{host}/blue.png", blue), ("red.png", png_bytes((200, 30, 30))),
                      (str(images_dir / "allowed" / "red.png"), png_bytes((200, 30, 30)))]:
        messages = user({"type": "image_url", "image_url": {"url": url}}, text("Colour?"))
        want = reference.complete(user({"type": "image", "image": data}, text("Colour?")), max_new_tokens=8)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want.text, url


# --- concurrency ---------------------------------------------------------------------------------------
def test_eight_concurrent_streams_are_complete_and_batched(server, client, reference):
    prompts = [f"Question {i}: " + f"tell me about the number {i}. " * (i + 1) for i in range(8)]
    budgets = [20 + 3 * i for i in range(8)]
    expected = [reference.complete(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    steps_before = httpx.get(server + "/health").json()["steps"]
    start = threading.Barrier(8)

    def stream(i):
        start.wait()
        pieces, usage = [], None
        messages = [{"role": "user", "content": prompts[i]}]
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=budgets[i],
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        return "".join(pieces), usage

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, range(8)))
    for (answer, usage), want in zip(results, expected):
        assert answer == want.text
        assert usage.completion_tokens == want.completion_tokens and usage.prompt_tokens == want.prompt_tokens
    steps = httpx.get(server + "/health").json()["steps"] - steps_before
    # Served together: one decode step advanced several requests at once.
    assert steps < sum(w.completion_tokens for w in expected) / 2


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_slot(server, stream):
    tokens_before = httpx.get(server + "/health").json()["tokens"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                       "stream": stream}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while not httpx.get(server + "/health").json()["active"]:  # wait until it is generating
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if stream:
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
    # Hung up mid-answer: the row must be freed long before the 2000 tokens are done.
    deadline = time.monotonic() + 10
    while (health := httpx.get(server + "/health").json())["active"]:
        assert time.monotonic() < deadline, "the abandoned request still holds its row"
        time.sleep(0.02)
    assert health["tokens"] - tokens_before < 1500


def test_full_queue_answers_503_and_the_server_recovers(reference):
    options = ServerOptions(model_name=MODEL, max_batch=1, max_queue=1, max_tokens=2000)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "stream": True}
    hang_up = threading.Event()

    def client(url):
        with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(r.read()), r.headers.get("retry-after")
            hang_up.wait(30)  # hold the row (or the queue place) until told to hang up
            return r.status_code, None, None

    with torch_threads(1), running_server(varied_tiny_model(), options) as url:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client, url) for _ in range(4)]
            # One row and one queue place: of four at once, at least two are turned away at once.
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            hang_up.set()
            results = [f.result(timeout=30) for f in futures]
        statuses = sorted(status for status, _, _ in results)
        assert statuses.count(503) >= 2 and statuses[0] == 200, statuses
        for status, error, retry_after in results:
            if status == 503:
                assert error["error"]["code"] == "server_busy" and retry_after == "1"
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5, "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == reference.complete("hi", max_new_tokens=5).text


# --- bad input -----------------------------------------------------------------------------------------
def post(server, body, key=KEY, raw=None, headers=None):
    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    if raw is not None:
        return httpx.post(server + "/v1/chat/completions", content=raw,
                          headers={**h, "Content-Type": "application/json"}, timeout=30)
    return httpx.post(server + "/v1/chat/completions", json=body, headers=h, timeout=30)


def chat(*parts, **fields):
    return {"model": MODEL, "messages": user(*parts), "max_tokens": 4, **fields}


CORRUPT_PNG = png_bytes()[:40] + b"\0" * 100
BAD_REQUESTS = {
    # name: (body, status, error code or None, words the message must contain)
    "malformed_json": (b'{"messages": [', 400, "invalid_json", "JSON"),
    "not_an_object": (b"[1, 2]", 400, "invalid_json", "object"),
    "no_messages": ({"model": MODEL}, 400, "invalid_value", "messages"),
    "empty_messages": ({"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    "bad_role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, None, "robot"),
    "bad_temperature": (chat(text("x"), temperature="hot"), 400, "invalid_value", "temperature"),
    "negative_max_tokens": (chat(text("x"), max_tokens=-3), 400, "invalid_value", "max_tokens"),
    "n_2": (chat(text("x"), n=2), 400, None, "n must be 1"),
    "unknown_model": (chat(text("x"), model="gpt-4o"), 404, "model_not_found", "gpt-4o"),
    "unknown_part_type": (chat({"type": "video_url", "video_url": {"url": "x"}}), 400, "unknown_part_type",
                          "video_url"),
    "part_not_object": (chat("just a string"), 400, None, "content[0]"),
    "bad_base64_audio": (chat({"type": "input_audio", "input_audio": {"data": "!!!not base64!!!",
                                                                       "format": "wav"}}),
                         400, "invalid_base64", "base64"),
    "corrupt_audio": (chat(audio(b"RIFF....WAVEfmt garbage" * 10)), 400, "invalid_media", "audio"),
    "bad_audio_format": (chat({"type": "input_audio", "input_audio": {"data": b64(wav_bytes()),
                                                                       "format": "midi"}}),
                         400, None, "midi"),
    "audio_too_long": (chat(audio(wav_bytes(6.0))), 400, "max_audio_seconds_exceeded", "max_audio_seconds"),
    "bad_base64_image": (chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}),
                         400, "invalid_base64", "base64"),
    "corrupt_image": (chat(image(CORRUPT_PNG)), 400, "invalid_media", "image"),
    "not_an_image": (chat(image(b"hello, I am text, not a picture" * 4)), 400, "invalid_media", "image"),
    "too_many_pixels": (chat(image(png_bytes(size=(1200, 1000)))), 400, "max_image_pixels_exceeded",
                        "max_image_pixels"),
    "too_many_images": (chat(*[image(png_bytes())] * 4), 400, "max_media_items_exceeded", "max_media_items"),
    "too_many_tokens": (chat(text("x"), max_tokens=5000), 400, "max_tokens_exceeded", "max_tokens"),
    "too_large": (chat(text("x" * 2_100_000)), 413, "max_body_bytes_exceeded", "max_body_bytes"),
    "disallowed_host": (chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
                        400, "url_not_allowed", "example.com"),
    "redirect_to_disallowed_host": (None, 400, "url_not_allowed", "localhost.invalid"),
    "path_outside_allowed_dir": (None, 400, "path_not_allowed", "not under an allowed directory"),
    "path_traversal": (chat({"type": "image_url", "image_url": {"url": "../secret.png"}}), 400,
                       "path_not_allowed", "allowed directory"),
    "symlink_out_of_allowed_dir": (chat({"type": "image_url", "image_url": {"url": "link.png"}}), 400,
                                   "path_not_allowed", "allowed directory"),
    "file_url_outside": (chat({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), 400,
                         "path_not_allowed", "allowed directory"),
    "context_too_long": (chat(text("word " * 2100)), 400, "context_length_exceeded", "context"),
    "tools": (chat(text("x"), tools=[{"type": "function", "function": {"name": "f"}}]), 400, None, "tools"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(server, image_host, images_dir, name):
    body, status, code, words = BAD_REQUESTS[name]
    if name == "redirect_to_disallowed_host":
        body = chat({"type": "image_url", "image_url": {"url": image_host[0] + "/redirect"}})
    if name == "path_outside_allowed_dir":
        body = chat({"type": "image_url", "image_url": {"url": str(images_dir / "secret.png")}})
    r = post(server, None, raw=body) if isinstance(body, bytes) else post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error
    if code:
        assert error["code"] == code, error


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user(image(png_bytes())) * 4, max_tokens=4)
    assert e.value.body["code"] == "max_media_items_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def test_unknown_routes_answer_openai_errors(server):
    r = httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def fuzz_cases(count: int, seed: int = 0):
    """Malformed requests: broken JSON, wrong types, broken media, hostile paths and URLs."""
    rng = random.Random(seed)
    good = json.dumps(chat(image(png_bytes()), audio(wav_bytes(0.3)), text("hi"))).encode()
    # Values that are wrong for each field (a JSON 1e309 is Infinity, which Python's json reads).
    junk = {"messages": [None, 0, "", [], {}, [[]], "x" * 300, True],
            "temperature": ["hot", -1, 3, [], {}, 1e309], "top_p": [0, -1, 2, "x", []],
            "max_tokens": [0, -1, "x", [], 10**7, 1.5], "stream": ["x" * 300, [], {}, 5],
            "stop": [[""], 5, [1], {"a": 1}, ["a", "b", "c", "d", "e"]], "seed": ["x", 1.5, [], {}],
            "n": [2, 0, "x"], "model": ["gpt-4", 5, []],
            "stream_options": [5, "x", [], {"include_usage": "maybe"}]}
    broken_parts = [
        {"type": "image_url"}, {"type": "image_url", "image_url": None},
        {"type": "image_url", "image_url": 5}, {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "image_url", "image_url": {"url": ""}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes())[:-30]}},
        {"type": "image_url", "image_url": {"url": "ftp://127.0.0.1/x.png"}},
        {"type": "image_url", "image_url": {"url": "/proc/self/environ"}},
        {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}},
        {"type": "input_audio"}, {"type": "input_audio", "input_audio": {"data": 12}},
        {"type": "input_audio", "input_audio": {"data": "/etc/passwd", "format": "wav"}},
        {"type": "input_audio", "input_audio": {"data": b64(b"\0" * 64), "format": "wav"}},
        {"type": "input_audio", "input_audio": {"data": b64(wav_bytes())[:50], "format": "wav"}},
        {"type": "text"}, {"type": "text", "text": 5}, {"type": None}, {"type": "image"},
        {"type": "audio", "audio": "/etc/passwd"}, {"type": "video", "video": "/dev/zero"}, {},
    ]
    for i in range(count):
        kind = i % 5
        if kind == 0:  # raw bytes: truncated or mangled JSON
            cut = rng.randrange(1, len(good) - 1)
            data = bytearray(good[:cut])
            for _ in range(rng.randrange(0, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield bytes(data) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(40))
        elif kind == 1:  # a wrong value in a top-level field
            body = chat(text("hi"))
            field = rng.choice(sorted(junk))
            body[field] = rng.choice(junk[field])
            yield body
        elif kind == 2:  # a broken content part among good ones
            parts = [text("hi"), rng.choice(broken_parts)]
            rng.shuffle(parts)
            yield chat(*parts)
        elif kind == 3:  # a broken message
            message = rng.choice([{"role": "user"}, {"content": "x"}, {"role": 5, "content": "x"},
                                  {"role": "tool", "content": "x"}, "text", None, [],
                                  {"role": "user", "content": 5}, {"role": "user", "content": {"a": 1}},
                                  {"role": "assistant", "content": [image(png_bytes())]}])
            yield {"model": MODEL, "messages": [message]}
        else:  # over a limit
            yield rng.choice([chat(*[image(png_bytes())] * rng.randrange(4, 9)),
                              chat(text("x"), max_tokens=rng.randrange(2001, 10**6)),
                              chat(image(png_bytes(size=(1001, 1001))))])


def test_fuzz_then_a_good_request(server, client, reference):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    statuses = []
    with httpx.Client(base_url=server, headers=headers, timeout=30) as http:
        for case in fuzz_cases(300):
            raw = case if isinstance(case, bytes) else json.dumps(case).encode()
            r = http.post("/v1/chat/completions", content=raw)
            assert 400 <= r.status_code < 500, (case if len(raw) < 2000 else raw[:200], r.status_code, r.text)
            assert "message" in r.json()["error"]
            statuses.append(r.status_code)
    assert len(statuses) == 300
    want = reference.complete("hi", max_new_tokens=6)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want.text
    assert httpx.get(server + "/health").json()["active"] == 0



def test_cli_options(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tinyomni")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "smollm2", "--api-key", "k", "--allow-host", "127.0.0.1",
                              "--allow-dir", str(tmp_path), "--max-body-mb", "1.5", "--max-media-items", "2",
                              "--max-tokens", "64", "--max-batch", "4"])
    options = cli.options_from_args(args)
    assert (options.api_key, options.allow_hosts, options.allow_dirs) == ("k", ["127.0.0.1"], [tmp_path])
    assert (options.max_body_bytes, options.max_media_items, options.max_tokens, options.max_batch) == \
           (int(1.5 * 2**20), 2, 64, 4)
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # loopback unless told otherwise
    bad = parser.parse_args(["serve", "--allow-dir", str(tmp_path / "missing")])
    assert bad.func(bad) == 2 and "not a directory" in capsys.readouterr().err
