"""Endpoint mode against a small OpenAI-compatible stub server on 127.0.0.1 (never anywhere else).

The stub answers like an oracle, but only from the bytes it receives: it hashes the first image (or the
audio) of each request and looks the answer up, so a perfect score proves that images travelled as
data URLs and audio as input_audio, intact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinyomni import eval as te
from tinyomni import world
from tinyomni.eval.endpoint import EndpointError, EndpointModel, chat_completions_url, to_openai_message

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


class Stub:
    """A ThreadingHTTPServer on loopback with a request log, an answer table and scripted failures."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.requests, self.fail_next = answers, [], []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                if stub.fail_next:
                    self.send_response(stub.fail_next.pop(0))
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": stub.answer(body)}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body: dict) -> str:
        content = body["messages"][-1]["content"]
        for part in content if isinstance(content, list) else []:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                return self.answers.get(hashlib.sha256(data).hexdigest(), "?")
            if part["type"] == "input_audio":
                data = base64.b64decode(part["input_audio"]["data"])
                return self.answers.get(hashlib.sha256(data).hexdigest(), "?")
        return "?"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    skills = ["color", "multi_same", "video_direction", "speech_math", "speech_vqa", "relation"]
    return world.write_dataset(tmp_path_factory.mktemp("ep"), skills=skills, n=2, split="test")


def _first_media(item) -> str:
    path = item.images[0] if item.images else item.video[0] if item.video else item.audio
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_endpoint_model_scores_like_the_oracle_through_a_stub_server(task, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    items = te.prepare_items(te.load_task(task), te.RunConfig())
    stub = Stub({_first_media(i): i.answers[0] for i in items})
    try:
        model = EndpointModel(stub.url, "stub-model", concurrency=3)
        config = te.RunConfig(batch_size=4, max_new_tokens=16, progress=False)
        summary = te.evaluate(model, items, tmp_path, "stub-model", config)
    finally:
        stub.close()
    assert summary["average"] == 100.0 and summary["errors"] == 0
    assert len(stub.requests) == len(items) == 12  # one request per item, no more
    first = stub.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "stub-model" and first["body"]["max_tokens"] == 16
    assert first["body"]["temperature"] == 0.0
    kinds = [[p["type"] for p in r["body"]["messages"][-1]["content"]] for r in stub.requests]
    assert ["image_url", "image_url", "text"] in kinds  # multi_same: two images
    assert ["text", "image_url"] * 6 + ["text"] in kinds  # a 6-frame clip: "Frame-k:" + image each
    assert ["image_url", "input_audio", "text"] in kinds  # spoken question about an image
    parts = [p for r in stub.requests for p in r["body"]["messages"][-1]["content"]]
    audio = next(p for p in parts if p["type"] == "input_audio")
    assert audio["input_audio"]["format"] == "wav"
    assert base64.b64decode(audio["input_audio"]["data"])[:4] == b"RIFF"


def test_endpoint_retries_busy_servers_and_reports_errors(task):
    stub = Stub({})
    try:
        model = EndpointModel(stub.url + "/chat/completions", "m", retries=2)
        messages = [{"role": "user", "content": "hi"}]
        stub.fail_next = [503, 429]
        assert model.chat(messages) == "?"  # two busy answers, then success
        assert len(stub.requests) == 3
        stub.fail_next = [400]
        with pytest.raises(EndpointError, match="HTTP 400"):
            model.chat(messages)
        assert len(stub.requests) == 4  # a client error is not retried
    finally:
        stub.close()
    with pytest.raises(EndpointError, match="cannot reach"):
        EndpointModel(stub.url, "m", retries=0, timeout=2).chat([{"role": "user", "content": "hi"}])


def test_message_conversion(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.jpg")
    message = {"role": "user", "content": [
        {"type": "image", "image": str(tmp_path / "a.jpg")},
        {"type": "image", "image": Image.new("RGB", (4, 4))},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "text", "text": "What?"}]}
    parts = to_openai_message(message)["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[2]["image_url"]["url"] == "https://example.invalid/x.png"  # passed through, not fetched
    assert parts[3] == {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_cli_endpoint_mode(task, tmp_path):
    import argparse

    from tinyomni.eval import cli as eval_cli

    items = te.load_task(task)
    stub = Stub({_first_media(i): i.answers[0] for i in items})
    try:
        parser = argparse.ArgumentParser()
        eval_cli.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["eval", "run", str(task), "--endpoint", stub.url, "--model", "stub",
                                  "--limit", "1", "--out", str(tmp_path)])
        assert args.func(args) == 0
    finally:
        stub.close()
    assert json.loads((tmp_path / "summary.json").read_text())["average"] == 100.0
    assert len(stub.requests) == 6
