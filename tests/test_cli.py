"""The `tinyomni` command as a user runs it: one-shot chat, interactive chat, info, the command list."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tinyomni.cli import main


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyomni.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_text_chat_answers_paris():
    # SmolLM2 alone: the reference model's LoRA costs it general knowledge (docs/model_card.md).
    result = run("chat", "--model", "smollm2", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    return str(tiny.save(tmp_path_factory.mktemp("cli") / "tiny"))


def test_one_shot_chat_with_image_video_and_audio(tiny_dir, media):
    result = run("chat", "--model", tiny_dir, "--image", media["red.png"], "--video", media["clip.gif"],
                 "--audio", media["tone.wav"], "--max-new-tokens", "4", "Describe everything.")
    assert result.returncode == 0, result.stderr


def test_interactive_chat_attaches_media_resets_and_quits(tiny_dir, media):
    session = f"/image {media['red.png']}\nWhat is this?\n/reset\nhello\n/image /nonexistent.png\nhi\n/quit\n"
    result = run("chat", "--model", tiny_dir, "--max-new-tokens", "3", stdin=session)
    assert result.returncode == 0, result.stderr
    assert "image attached" in result.stderr and "conversation reset" in result.stderr
    assert "error:" in result.stderr and "nonexistent.png" in result.stderr  # a bad file does not end it
    assert result.stdout.count("assistant>") == 3


def test_info_shows_parts_context_and_image_tokens(tiny_dir, capsys):
    assert main(["info", "--model", tiny_dir, "--image-size", "112x56"]) == 0
    out = capsys.readouterr().out
    for expected in ("vision_tower", "audio_tower", "language_model", "context length", "2048 tokens",
                     "image 112x56", "3 tiles"):
        assert expected in out


def test_errors_are_one_line_not_a_traceback(tmp_path):
    result = run("chat", "--model", str(tmp_path / "nope"), "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: no model at") and "Traceback" not in result.stderr


def test_help_lists_every_command_without_importing_them():
    from tinyomni.cli import build_parser

    # Only the command that runs imports its module; the listing is the same as with every module loaded.
    assert build_parser(command="chat").format_help() == build_parser().format_help()
    listing = run("--help")
    assert listing.returncode == 0
    for command in ("chat", "info", "quantize", "export", "world", "train", "eval", "serve"):
        assert f"    {command} " in listing.stdout
    serve = run("serve", "--help")
    assert serve.returncode == 0 and "--max-batch" in serve.stdout
    distill = run("distill", "--help")  # one of two commands from one module (train/cli.py)
    assert distill.returncode == 0 and "--teacher" in distill.stdout
    code = ("import sys\nfrom tinyomni.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert bare.stdout.strip().splitlines()[-1] == "False"  # listing the commands needs no model, nor torch


def test_one_shot_chat_imports_no_other_command_and_no_transformers(tiny_dir):
    heavy = ["transformers", "fastapi", "uvicorn", "tinyomni.serve", "tinyomni.train", "tinyomni.eval",
             "tinyomni.world", "torch._dynamo"]
    code = (f"import sys; from tinyomni.cli import main; rc = main(['chat', '--model', {tiny_dir!r}, "
            f"'--max-new-tokens', '2', 'hi']); print(sorted(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
