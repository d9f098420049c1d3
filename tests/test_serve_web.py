"""The web chat page in headless Chromium (Debian's chromium, driven by Playwright): upload an image,
ask, see the streamed answer (the same one the core gives), go on to a second turn, drop a file,
record from a fake microphone (webm/opus, decoded by the server), reset. Saves a screenshot."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from serve_support import png_bytes, running_server, torch_threads, varied_tiny_model, wav_bytes

from tinyomni.serve.server import ServerOptions

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("TINYOMNI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        # A fake microphone (a beep) that the page may use without a permission prompt.
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
MODEL = "tiny"
ANSWER_TOKENS = 12


@pytest.fixture(scope="module")
def reference():
    with torch_threads(1):
        yield varied_tiny_model()


@pytest.fixture(scope="module")
def server():
    options = ServerOptions(model_name=MODEL, max_tokens=64)
    with torch_threads(1), running_server(varied_tiny_model(), options) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    sync_api.expect(page.locator("#model-name")).to_have_text(MODEL)
    page.set_default_timeout(15_000)
    page.click("#settings summary")  # as a person would: open the settings, set greedy decoding, close
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(ANSWER_TOKENS))
    page.click("#settings summary")
    yield page
    context.close()
    assert not errors, errors


def answers(page):
    done = page.locator(".message.assistant[data-done=true] .text")
    return [done.nth(i).inner_text() for i in range(done.count())]


def wait_for_answers(page, n):
    sync_api.expect(page.locator(".message.assistant[data-done=true]")).to_have_count(n, timeout=30_000)
    assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_inner_texts()
    return answers(page)


def test_image_question_streams_the_answer(page, reference, tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes((200, 30, 30), (96, 64)))
    page.set_input_files("#image-input", str(picture))
    sync_api.expect(page.locator("#attachments img")).to_have_count(1)  # the preview
    page.fill("#prompt", "What colour is this?")
    page.press("#prompt", "Enter")
    first = [{"role": "user", "content": [{"type": "image", "image": picture.read_bytes()},
                                          {"type": "text", "text": "What colour is this?"}]}]
    want = reference.complete(first, max_new_tokens=ANSWER_TOKENS)
    assert wait_for_answers(page, 1) == [want.text]
    assert page.locator(".message.user img").count() == 1
    assert page.locator("#attachments *").count() == 0
    assert "tokens" in page.locator(".message.assistant .meta").inner_text()

    # A second turn carries the whole conversation, image included.
    page.fill("#prompt", "Are you sure?")
    page.click("#send")
    second = first + [{"role": "assistant", "content": want.text},
                      {"role": "user", "content": "Are you sure?"}]
    want2 = reference.complete(second, max_new_tokens=ANSWER_TOKENS)
    assert wait_for_answers(page, 2) == [want.text, want2.text]

    shot = tmp_path / "web_chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TINYOMNI_SCREENSHOT_DIR"):  # to keep one for people to look at
        shutil.copy(shot, Path(os.environ["TINYOMNI_SCREENSHOT_DIR"]) / "web_chat.png")

    # Reset forgets the conversation: the next answer is that of a fresh one.
    page.click("#reset")
    assert page.locator(".message").count() == 0
    page.fill("#prompt", "hi")
    page.click("#send")
    assert wait_for_answers(page, 1) == [reference.complete("hi", max_new_tokens=ANSWER_TOKENS).text]


def test_drop_upload_and_microphone(page, reference, tmp_path):
    # Drag and drop an image onto the page (a synthetic drop event with a real File).
    png = base64.b64encode(png_bytes((30, 200, 30))).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "green.png", {type: "image/png"}));
        window.dispatchEvent(new DragEvent("dragenter", {dataTransfer: data}));
        window.dispatchEvent(new DragEvent("drop", {dataTransfer: data}));
    }""", png)
    sync_api.expect(page.locator("#attachments img")).to_have_count(1)
    assert page.locator("#drop-overlay").is_hidden()

    # An audio file from the picker.
    clip = tmp_path / "tone.wav"
    clip.write_bytes(wav_bytes(0.6))
    page.set_input_files("#audio-input", str(clip))
    sync_api.expect(page.locator("#attachments audio")).to_have_count(1)
    page.fill("#prompt", "Describe both.")
    page.click("#send")
    want = reference.complete([{"role": "user", "content": [
        {"type": "image", "image": png_bytes((30, 200, 30))}, {"type": "audio", "audio": clip.read_bytes()},
        {"type": "text", "text": "Describe both."}]}], max_new_tokens=ANSWER_TOKENS)
    assert wait_for_answers(page, 1) == [want.text]

    # The microphone: the browser records webm/opus; the server must decode it.
    page.click("#reset")
    page.click("#record")
    sync_api.expect(page.locator("#record.recording")).to_have_count(1)
    page.wait_for_timeout(1200)
    page.click("#record")
    sync_api.expect(page.locator("#attachments audio")).to_have_count(1)
    page.fill("#prompt", "What did you hear?")
    page.click("#send")
    (answer,) = wait_for_answers(page, 1)
    assert answer  # decoded and answered; the content of a fake beep is not ours to check


def test_api_key_from_settings(browser, reference):
    options = ServerOptions(model_name=MODEL, api_key="sesame", max_tokens=64)
    with torch_threads(1), running_server(varied_tiny_model(), options) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(url + "/")
        sync_api.expect(page.locator("#model-name")).to_have_text("model unknown")
        page.fill("#prompt", "hi")
        page.click("#send")
        sync_api.expect(page.locator(".message.error")).to_contain_text("API key")
        assert page.locator("#settings").get_attribute("open") is not None  # opened where the key goes
        page.fill("#api-key", "sesame")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(ANSWER_TOKENS))
        page.press("#api-key", "Tab")  # a change event: the page lists the models again, with the key
        sync_api.expect(page.locator("#model-name")).to_have_text(MODEL)
        page.fill("#prompt", "hi")
        page.click("#send")
        sync_api.expect(page.locator(".message.assistant[data-done=true]")).to_have_count(1)
        assert answers(page) == [reference.complete("hi", max_new_tokens=ANSWER_TOKENS).text]
        context.close()
