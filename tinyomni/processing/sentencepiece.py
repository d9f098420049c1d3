"""A SentencePiece BPE `tokenizer.model` as a `tokenizers` tokenizer, for checkpoints that ship no
tokenizer.json (InternLM2's, so InternVL2-2B's and Mini-InternVL-Chat-2B-V1-5's; older Llama and
Phi-3-based ones).

The file is a protobuf `ModelProto` (sentencepiece's sentencepiece_model.proto): repeated `pieces`
(field 1: piece string, score float, type enum), `trainer_spec` (2: model_type, byte_fallback, the
unk/bos/eos ids) and `normalizer_spec` (3: normalizer name, add_dummy_prefix, remove_extra_whitespaces,
escape_whitespaces). It is read here with a few lines of wire-format decoding, so neither the
sentencepiece nor the protobuf package is needed at run time.

How the result reproduces sentencepiece's BPE (and the slow transformers tokenizers built on it, which
split the text at added tokens and give each piece to sentencepiece):
- a piece's vocabulary id is its index; the merges are every split of a NORMAL piece into two pieces of
  the vocabulary, ranked by the merged piece's score (sentencepiece merges the adjacent pair whose
  concatenation scores highest), so the same pairs merge in the same order;
- the normalizer writes spaces as "▁" and prepends one "▁" to each text between added tokens
  (add_dummy_prefix), which is what sentencepiece does to each piece it is given; with the tokenizer
  config's `"legacy": false` (Llama / Phi-3 tokenizers) only the text at the very start gets it, as
  transformers' Llama conversion does (a Metaspace pre-tokenizer, prepend_scheme "first");
- characters outside the vocabulary become their UTF-8 bytes' <0xNN> pieces (byte_fallback), else <unk>;
- the decoder undoes the two (and drops the dummy prefix's space).
Only what can be reproduced exactly is converted: a unigram model, a non-identity normalizer (NFKC
tables) or remove_extra_whitespaces is a CheckpointError naming it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from tinyomni.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
BPE = 2  # TrainerSpec.ModelType (UNIGRAM = 1)
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
SPACE = "\u2581"


@dataclass
class SentencePieceModel:
    """What a tokenizer.model says, in the proto's own terms (defaults as the proto declares them)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    normalizer: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# --- protobuf wire format ------------------------------------------------------------------------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) for each field of one message: ints for varints, bytes for
    length-delimited fields, raw 4 / 8 bytes for fixed ones."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32s are 10-byte varints


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    """Parse a sentencepiece tokenizer.model, or a CheckpointError naming the file."""
    path = Path(path)
    model = SentencePieceModel()
    try:
        for number, wire, value in _fields(path.read_bytes()):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:
                for n, w, v in _fields(value):
                    if w != 0:
                        continue
                    if n == 3:
                        model.model_type = v
                    elif n == 24:
                        model.treat_whitespace_as_suffix = bool(v)
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n in (40, 41, 42):
                        setattr(model, {40: "unk_id", 41: "bos_id", 42: "eos_id"}[n], _int32(v))
            elif number == 3 and wire == 2:
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        model.normalizer = v.decode("utf-8")
                    elif n == 2 and w == 2:
                        model.precompiled_charsmap = bytes(v)
                    elif n in (3, 4, 5) and w == 0:
                        setattr(model, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                                        5: "escape_whitespaces"}[n], bool(v))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable sentencepiece model ({e})") from None
    if not model.pieces:
        raise CheckpointError(f"{path} is not a sentencepiece model (it has no pieces)")
    return model


# --- the tokenizers version ----------------------------------------------------------------------------
def _check(model: SentencePieceModel, where: str) -> None:
    problems = []
    if model.model_type != BPE:
        problems.append(f"model_type {MODEL_TYPES.get(model.model_type, model.model_type)} (only bpe)")
    if model.normalizer not in ("", "identity") or model.precompiled_charsmap:
        problems.append(f"normalizer {model.normalizer!r} (only identity)")
    if model.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces true")
    if not model.escape_whitespaces or model.treat_whitespace_as_suffix:
        problems.append("escape_whitespaces false or treat_whitespace_as_suffix true")
    if problems:
        raise CheckpointError(f"{where}: this sentencepiece model cannot be converted exactly: {'; '.join(problems)}")


def _merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a NORMAL piece, best-scoring result first (ties: lower
    id first, then the shorter left part, a fixed order)."""
    ids = {piece: i for i, (piece, _, kind) in enumerate(model.pieces) if kind == NORMAL}
    ranked = []
    for piece, i in ids.items():
        score = model.pieces[i][1]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_from_sentencepiece(path: str | Path, added: list[tuple[int, AddedToken]] = (),
                                 legacy: bool = True) -> Tokenizer:
    """A tokenizers Tokenizer equal to the sentencepiece model at `path` (see the module doc), with the
    checkpoint's `added` tokens (id, token) at their ids; a CheckpointError where that cannot be exact.
    legacy: every text between added tokens gets the dummy prefix (False: only the input's first)."""
    where = str(path)
    model = read_sentencepiece(path)
    _check(model, where)
    vocab: dict[str, int] = {}
    for i, (piece, _, _) in enumerate(model.pieces):
        vocab.setdefault(piece, i)
    unk = model.pieces[model.unk_id][0] if 0 <= model.unk_id < len(model.pieces) else None
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_merges(model), unk_token=unk, fuse_unk=True,
                                   byte_fallback=model.byte_fallback))
    if legacy or not model.add_dummy_prefix:
        steps = [normalizers.Replace(" ", SPACE)]
        if model.add_dummy_prefix:
            steps.insert(0, normalizers.Prepend(SPACE))
        backend.normalizer = normalizers.Sequence(steps)
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tail = [decoders.Strip(" ", 1, 0)] if model.add_dummy_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *tail])
    listed = {token.content for _, token in added}
    # Pieces sentencepiece never makes by merging: its control tokens (<s>, </s>) and user-defined symbols.
    # User-defined ones it matches anywhere in the normalized text, so they split it after normalization.
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                for piece, _, kind in model.pieces if kind == CONTROL and piece not in listed])
    backend.add_tokens([AddedToken(piece, special=False, normalized=True)
                        for piece, _, kind in model.pieces if kind == USER_DEFINED and piece not in listed])
    for token_id, token in sorted(added, key=lambda item: item[0]):
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(token.content) != token_id:
            raise CheckpointError(f"{where}: added token {token.content!r} is id {token_id} in the tokenizer config "
                                  f"but would be {backend.token_to_id(token.content)} here (ids must follow the "
                                  f"{len(model.pieces)} pieces without gaps)")
    return backend


def added_tokens(meta: dict, extra: dict) -> list[tuple[int, AddedToken]]:
    """The added tokens a transformers tokenizer directory lists: tokenizer_config.json's
    `added_tokens_decoder` ({id: {content, special, lstrip, rstrip, single_word}}) and added_tokens.json
    ({content: id}, `extra`). Each splits the raw text (normalized=False), as slow tokenizers split it."""
    found: dict[int, AddedToken] = {}
    for key, entry in (meta.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and "content" in entry:
            found[int(key)] = AddedToken(entry["content"], special=bool(entry.get("special", False)),
                                         lstrip=bool(entry.get("lstrip", False)),
                                         rstrip=bool(entry.get("rstrip", False)),
                                         single_word=bool(entry.get("single_word", False)), normalized=False)
    for content, token_id in extra.items():
        found.setdefault(int(token_id), AddedToken(content, special=False, normalized=False))
    return sorted(found.items(), key=lambda item: item[0])


def tokenizer_for_dir(path: Path, meta: dict) -> Tokenizer:
    """The tokenizers backend for a directory with tokenizer.model and no tokenizer.json."""
    extra_file = path / "added_tokens.json"
    extra = {}
    if extra_file.is_file():
        try:
            extra = json.loads(extra_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{extra_file} is not valid JSON: {e}") from None
    legacy = meta.get("legacy")  # absent or null: the slow tokenizers' default, legacy
    return tokenizer_from_sentencepiece(path / "tokenizer.model", added_tokens(meta, extra), legacy is not False)
