"""`tinyomni distill`: SFT data with a teacher's answers, from any OpenAI-compatible endpoint.

    export OPENAI_API_KEY=...        # read from the environment (or --api-key-env NAME), never written
    tinyomni distill --teacher https://api.openai.com --teacher-model gpt-4o-mini \\
        --data world/train.jsonl --out distilled.jsonl
    tinyomni train recipe.toml       # with data = { jsonl = "distilled.jsonl" } in an sft stage

Each input record (a world/task record, a record of chat `messages`, or a LLaVA record; JSONL or a
LLaVA JSON list) becomes one output record of `messages` whose assistant turns are the teacher's:
every assistant turn of the input is asked again, in order, with the teacher's own earlier answers as
the history, and a record that ends with a user turn gets an answer. Media go as data URLs through the
eval harness's endpoint client (tinyomni/eval/endpoint.py: images as image_url, audio as input_audio,
a video as its frames), which also retries busy answers (429, 5xx) and timeouts with backoff. Media
paths in the output are relative to its folder, so the file trains where it is.

Resumable: each finished record is one line appended with a single write, so a kill leaves at most one
cut line, which the next run drops; a rerun skips the records already written (matched by position in
the input and a hash of the record, so another input is refused rather than mixed in).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyomni.errors import ConfigError, InputError

# Answers the teacher refuses for one record (too large, invalid content): that record fails, the rest
# go on. Any other error (unreachable, a bad key or model name, still busy after the retries) stops the run.
RECORD_ERRORS = (400, 413, 415, 422)


@dataclass
class DistillResult:
    out: Path
    written: int  # records this run wrote
    skipped: int  # records already in the output
    failed: list[str] = field(default_factory=list)  # "record: reason" of each record that failed


# --- input -----------------------------------------------------------------------------------------

def read_input(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, or of a JSON list (LLaVA's format), with the bad line named."""
    if not path.is_file():
        raise InputError(f"input data not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n} is not JSON: {e}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path} must hold JSON objects, one per record")
    if not records:
        raise InputError(f"{path} has no records")
    return records


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def prompt_messages(record: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """The record's chat messages (media paths absolute), checked: a user turn, media files present."""
    from tinyomni.train.data import record_messages

    try:
        messages = record_messages(record, root)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"not a world, chat-messages or LLaVA record ({type(e).__name__}: {e})") from None
    if not any(m.get("role") == "user" for m in messages):
        raise InputError("no user turn to ask the teacher")
    for path in media_paths(messages):
        if not Path(path).is_file():
            raise InputError(f"media file not found: {path}")
    return messages


def media_paths(messages: list[dict[str, Any]]) -> list[str]:
    """The local files the messages' media parts name (not data: or http(s) URLs, not in-memory images)."""
    out = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            for key in ("image", "video", "audio"):
                value = part.get(key) if isinstance(part, dict) else None
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, (str, os.PathLike)) and not str(v).startswith(("data:", "http://", "https://")):
                        out.append(str(v))
    return out


def relative_media(messages: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Media paths made relative to `folder` (where the output is), as the data loader reads them."""
    def rel(value: Any) -> Any:
        if isinstance(value, list):
            return [rel(v) for v in value]
        if isinstance(value, os.PathLike):
            value = str(value)
        if isinstance(value, str) and Path(value).is_absolute():
            return os.path.relpath(value, folder)
        return value

    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{k: rel(v) if k in ("image", "video", "audio") else v for k, v in part.items()}
                       if isinstance(part, dict) else part for part in content]
        out.append({**message, "content": content})
    return out


# --- output (resume) -------------------------------------------------------------------------------

def done_records(out: Path) -> dict[int, str]:
    """Input position -> record hash of every record already in `out`. A last line cut by a kill is
    removed from the file first, so the next append starts a fresh line."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with out.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    done = {}
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            source = json.loads(line)["distill"]
            done[int(source["index"])] = str(source["hash"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{out} line {n} is not a record `tinyomni distill` wrote; choose another --out") from None
    return done


def _append(fd: int, record: dict[str, Any]) -> None:
    """One record, one write of one whole line to a file opened with O_APPEND."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    view = memoryview(line)
    while view:
        view = view[os.write(fd, view):]


# --- asking the teacher ----------------------------------------------------------------------------

def ask(teacher: Any, messages: list[dict[str, Any]], max_tokens: int, temperature: float,
        system: str | None = None) -> list[dict[str, Any]]:
    """The conversation with each assistant turn (and a final one after a last user turn) the teacher's."""
    history: list[dict[str, Any]] = []
    lead = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if message["role"] == "assistant":
            history.append({"role": "assistant", "content": _answer(teacher, lead + history, max_tokens, temperature)})
        else:
            history.append(message)
    if history[-1]["role"] != "assistant":
        history.append({"role": "assistant", "content": _answer(teacher, lead + history, max_tokens, temperature)})
    return history


def _answer(teacher: Any, messages: list[dict[str, Any]], max_tokens: int, temperature: float) -> str:
    from tinyomni.eval.endpoint import EndpointError

    answer = teacher.chat(messages, max_new_tokens=max_tokens, temperature=temperature)
    if not answer.strip():
        raise EndpointError("the teacher answered with nothing", status=422)
    return answer


def distill(data: str | Path, out: str | Path, teacher: Any, *, max_tokens: int = 512, temperature: float = 0.0,
            system: str | None = None, image_folder: str | Path | None = None, limit: int | None = None,
            skip_invalid: bool = False, progress: bool = True) -> DistillResult:
    """Write `out` (JSONL, appended to) with `teacher`'s answers to the records of `data`. `teacher` is
    an `EndpointModel` (anything with `chat(messages, max_new_tokens, temperature)` and `concurrency`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tinyomni.eval.endpoint import EndpointError

    data, out = Path(data), Path(out)
    root = Path(image_folder or data.parent).resolve()
    records = read_input(data)
    done = done_records(out)
    hashes = [record_hash(r) for r in records]
    for index, h in done.items():
        if index >= len(records) or hashes[index] != h:
            raise InputError(f"{out} holds answers to other records than {data}'s (record {index} differs); "
                             "choose another --out")
    # Every record is checked before the first request, so a typo in a path costs no teacher calls.
    todo, invalid = [], []
    for index, record in enumerate(records[:limit]):
        if index in done:
            continue
        try:
            todo.append((index, prompt_messages(record, root)))
        except InputError as e:
            invalid.append(f"record {index} ({record.get('id', 'no id')}): {e}")
    if invalid and not skip_invalid:
        more = f" (and {len(invalid) - 5} more)" if len(invalid) > 5 else ""
        raise InputError(f"{data}: {len(invalid)} record(s) cannot be sent: " + "; ".join(invalid[:5]) + more
                         + "; fix them, or pass --skip-invalid to distil the others")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent.resolve()
    result = DistillResult(out, 0, len(done), list(invalid))
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bar = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]}"),
                   TimeRemainingColumn(), disable=not progress, transient=False)
    workers = max(1, int(getattr(teacher, "concurrency", 1)))
    pool = cf.ThreadPoolExecutor(max_workers=workers)
    try:
        with bar:
            total = len(records[:limit])
            task = bar.add_task("distill", total=total, completed=sum(i < total for i in done), failed="")
            pending: dict[cf.Future, int] = {}
            queue = iter(todo)

            def submit() -> None:  # at most two requests' worth of records waiting per worker
                for index, messages in queue:
                    pending[pool.submit(ask, teacher, messages, max_tokens, temperature, system)] = index
                    if len(pending) >= 2 * workers:
                        return

            submit()
            while pending:
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    record = records[index]
                    try:
                        conversation = future.result()
                    except (EndpointError, InputError) as e:
                        if isinstance(e, EndpointError) and e.status not in RECORD_ERRORS:
                            for other in pending:
                                other.cancel()
                            raise
                        result.failed.append(f"record {index} ({record.get('id', 'no id')}): {e}")
                        bar.update(task, advance=1, failed=f"{len(result.failed)} failed")
                        continue
                    _append(fd, {"id": record.get("id", f"{data.stem}-{index}"),
                                 "messages": relative_media(conversation, folder),
                                 "distill": {"index": index, "hash": hashes[index],
                                             "teacher": getattr(teacher, "model", None)}})
                    result.written += 1
                    bar.update(task, advance=1)
                submit()
    except EndpointError as e:
        raise EndpointError(f"{e}\n{result.written + result.skipped} record(s) are in {out}; run the same "
                            "command again to continue", status=e.status) from None
    finally:  # on a kill or an error, requests still in flight are not waited for
        pool.shutdown(wait=False, cancel_futures=True)
        os.close(fd)
    return result


def run(args: Any) -> int:
    """The command (arguments: train/cli.py)."""
    from tinyomni.eval.endpoint import EndpointModel

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    teacher = EndpointModel(args.teacher, args.teacher_model, api_key=key, timeout=args.timeout,
                            concurrency=args.concurrency, retries=args.retries)
    result = distill(args.data, args.out, teacher, max_tokens=args.max_tokens, temperature=args.temperature,
                     system=args.system, image_folder=args.image_folder, limit=args.limit,
                     skip_invalid=args.skip_invalid, progress=not args.no_progress)
    print(f"{result.out}: {result.written} record(s) written, {result.skipped} already there, "
          f"{len(result.failed)} failed")
    for line in result.failed[:10]:
        print(f"  failed: {line}", file=sys.stderr)
    if result.failed:
        print("rerun the same command to retry the failed records", file=sys.stderr)
    return 1 if result.failed else 0
