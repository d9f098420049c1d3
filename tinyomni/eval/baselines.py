"""Reference "models" that answer from the task file itself: a random guesser and an oracle.

They speak the same chat protocol as a real model, so they run through the very same runner path
(messages, batching, scoring). The random guess shows a task's chance level; the oracle, which reads
the reference answers, must score 100 % and so checks the task file and the metrics together.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tinyomni.errors import InputError
from tinyomni.eval.tasks import LETTERS, Item, item_messages


def message_key(messages: list[dict[str, Any]]) -> str:
    """A key naming a request by its text and media (paths, or object ids for in-memory media)."""
    parts = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts.append(f"{m['role']}:{content}")
            continue
        for part in content:
            kind = part["type"]
            value = part.get(kind)
            parts.append(f"{kind}:{value if isinstance(value, (str, list)) else id(value)}")
    return "\n".join(parts)


class _LookupModel:
    def __init__(self, items: Sequence[Item]):
        self.items = {message_key(item_messages(item)): item for item in items}

    def _item(self, messages: list[dict[str, Any]]) -> Item:
        key = message_key(messages)
        if key not in self.items:
            raise InputError("baseline model got a request that is not one of its task's items")
        return self.items[key]

    def answer(self, item: Item) -> str:
        raise NotImplementedError

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 64, **_: Any) -> str:
        return self.answer(self._item(messages))

    def chat_batch(self, batch: list[list[dict[str, Any]]], max_new_tokens: int = 64, **_: Any) -> list[str]:
        return [self.chat(m, max_new_tokens) for m in batch]


class OracleModel(_LookupModel):
    """Answers every item with its first reference answer."""

    def answer(self, item: Item) -> str:
        return item.answers[0]


class RandomGuessModel(_LookupModel):
    """Guesses uniformly: an option letter, a candidate, yes/no for POPE and MME; for open questions a
    reference answer of another item of the same task (a prior, not a cheat). Seeded per item."""

    def __init__(self, items: Sequence[Item], seed: int = 0):
        super().__init__(items)
        self.seed = seed
        self.pool: dict[str, list[str]] = defaultdict(list)
        for item in items:
            self.pool[item.task].append(item.answers[0])

    def answer(self, item: Item) -> str:
        rng = random.Random(f"{self.seed}/{item.id}")
        if item.choices:
            return LETTERS[rng.randrange(len(item.choices))]
        if item.candidates:
            return rng.choice(list(item.candidates))
        if item.metric in ("pope", "mme"):
            return rng.choice(["yes", "no"])
        return rng.choice(self.pool[item.task])
