"""Encoded media kept by content: an image tile or audio clip seen again (the next turn of a
conversation, which sends its images again; another request to the server with the same picture) is
not run through its tower and projector a second time.

Keys are a hash of what the tower reads (the preprocessed pixels or log-mel features, bytes, shape
and dtype, plus any side input such as a Q-Former instruction) and of the encoder weights' state
(each parameter's identity and in-place version counter), so a fine-tuning step, `load_state_dict` or
a cast makes older entries unreachable instead of wrong. OmniModel consults it only without autograd
(training always runs its encoders). Least recently used entries go first once `max_bytes` is reached.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from tinyomni.errors import InputError

SIZE_ENV = "TINYOMNI_MEDIA_CACHE_MB"  # capacity in MB; 0 turns the cache off
DEFAULT_MB = 128


class MediaCache:
    """An LRU map from content keys to encoder outputs, bounded by the outputs' bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MB << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, Tensor] = OrderedDict()

    @classmethod
    def from_env(cls) -> MediaCache | None:
        """The cache TINYOMNI_MEDIA_CACHE_MB asks for (default 128 MB), or None when it is 0."""
        raw = os.environ.get(SIZE_ENV, str(DEFAULT_MB))
        try:
            mb = float(raw)
        except ValueError:
            raise InputError(f"{SIZE_ENV}={raw!r} is not a number of megabytes") from None
        return cls(int(mb * (1 << 20))) if mb > 0 else None

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(kind: str, state: int, *inputs: Tensor | str | None) -> bytes:
        """The key of encoding `inputs` (tensors; text for small side inputs; None for an absent one)
        with encoder `state`."""
        digest = hashlib.blake2b(f"{kind}:{state}".encode(), digest_size=20)
        for t in inputs:
            if not isinstance(t, Tensor):
                digest.update(f"|{t!r}|".encode())
                continue
            t = t.detach().contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        return digest.digest()

    def get(self, key: bytes) -> Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        value = value.detach()
        if value.untyped_storage().nbytes() > size:  # one tile of a batch: keep it, not the whole batch
            value = value.clone()
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def weights_state(modules: Iterable[nn.Module | None]) -> int:
    """A number that changes when any parameter or buffer of `modules` is replaced or modified in place."""
    return hash(tuple((id(t), _version(t)) for m in modules if m is not None
                      for t in (*m.parameters(), *m.buffers())))


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # a tensor made under inference_mode keeps no version counter (nor can change)
        return -1
