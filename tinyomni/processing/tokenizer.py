"""Text ↔ token ids, with the `tokenizers` library, built from a tokenizer.json or a GGUF vocabulary.

Also owns the special tokens a model relies on: end-of-turn ids (stop generation) and the media
placeholder tokens (`<img>`, `<IMG_CONTEXT>`, ...) that the omni model adds to a text-only vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tinyomni.checkpoints.gguf import GGUFTokenizerData
from tinyomni.errors import CheckpointError

CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for special/control tokens
USER_DEFINED_TOKEN_TYPE = 4

# How each llama.cpp pre-tokenizer splits text before BPE. SmolLM2/StarCoder split every digit
# apart, then use GPT-2's pattern; Llama 3 and Qwen2 use their own patterns.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
PATTERN_BY_PRE = {"llama3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN,
                  "qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN}


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` plus the ids the model needs to know."""

    def __init__(self, backend: HFTokenizer, eos_token_ids: list[int], bos_token_id: int | None = None,
                 pad_token_id: int | None = None, add_bos_token: bool = False) -> None:
        self.backend = backend
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0)
        self.add_bos_token = add_bos_token

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, data: GGUFTokenizerData) -> Tokenizer:
        if data.model != "gpt2":
            raise CheckpointError(
                f"GGUF tokenizer model {data.model!r} is not supported yet (byte-level BPE 'gpt2' is)")
        vocab = {token: i for i, token in enumerate(data.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data.merges]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.decoder = decoders.ByteLevel()
        if data.pre in DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        else:
            pattern = PATTERN_BY_PRE.get(data.pre or "", GPT2_PATTERN)
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        special = [AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(data.tokens, data.token_types) if kind == CONTROL_TOKEN_TYPE]
        user = [AddedToken(t, special=False, normalized=False)
                for t, kind in zip(data.tokens, data.token_types) if kind == USER_DEFINED_TOKEN_TYPE]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        eos = [data.eos_token_id] if data.eos_token_id is not None else []
        return cls(backend, eos, data.bos_token_id, data.pad_token_id, data.add_bos_token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json` for the special ids) from a directory."""
        path = Path(path)
        file = path / "tokenizer.json"
        # No tokenizer.json but a sentencepiece tokenizer.model (InternLM2, older Llama / Phi-3 exports):
        # converted at load (processing/sentencepiece.py); such tokenizers prepend BOS unless told otherwise.
        sentencepiece = not file.is_file() and (path / "tokenizer.model").is_file()
        if sentencepiece:
            from tinyomni.processing.sentencepiece import tokenizer_for_dir

            backend = tokenizer_for_dir(path, _read_json(path / "tokenizer_config.json"))
        elif not file.is_file():
            raise CheckpointError(f"tokenizer file missing: {file} (and no sentencepiece tokenizer.model)")
        else:
            try:
                backend = HFTokenizer.from_file(str(file))
            except Exception as e:
                raise CheckpointError(f"{file} is not a valid tokenizer.json ({e})") from None
        meta = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")

        def token_id(value) -> int | None:
            if isinstance(value, dict):  # transformers writes AddedToken dicts sometimes
                value = value.get("content")
            return None if value is None else backend.token_to_id(value)

        eos: list[int] = []
        if "eos_token_ids" in meta:  # our own format
            eos = list(meta["eos_token_ids"])
        else:
            gen_eos = gen.get("eos_token_id")
            if gen_eos is not None:
                eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
            elif token_id(meta.get("eos_token")) is not None:
                eos = [token_id(meta.get("eos_token"))]
        bos = meta.get("bos_token_id", token_id(meta.get("bos_token")))
        pad = meta.get("pad_token_id", token_id(meta.get("pad_token")))
        return cls(backend, eos, bos, pad, bool(meta.get("add_bos_token", sentencepiece)))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        meta = {"eos_token_ids": self.eos_token_ids, "bos_token_id": self.bos_token_id,
                "pad_token_id": self.pad_token_id, "add_bos_token": self.add_bos_token,
                "eos_token": self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None}
        (path / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")

    # --- use ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens (if missing) that are always matched whole; returns their ids."""
        missing = [t for t in tokens if self.backend.token_to_id(t) is None]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            self._as_text = None
            self._special_ids = None
        return [self.backend.token_to_id(t) for t in tokens]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the control tokens (`<|im_start|>`, `<img>`, ...): only a template may write them."""
        if getattr(self, "_special_ids", None) is None:
            self._special_ids = frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    def encode_as_text(self, text: str) -> list[int]:
        """Encode user text in which control-token strings are plain characters ("<|im_start|>" typed
        in a message is spelt out, never the token). Never adds BOS."""
        if getattr(self, "_as_text", None) is None:
            # A second backend, so concurrent encodes (the server's threads) never see a flag flip.
            self._as_text = HFTokenizer.from_str(self.backend.to_str())
            self._as_text.encode_special_tokens = True
        return self._as_text.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_piece(self, text: str) -> list[int]:
        """Encode a piece of a longer prompt: never adds BOS."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
