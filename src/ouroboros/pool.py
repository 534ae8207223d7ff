"""The phrase pool: for each key token, an ordered set of the N-1 tokens seen or guessed after it."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from .errors import ConfigError
from .files import write_json_atomically

Phrase = tuple[int, ...]


class PhraseSource(Protocol):
    """Where drafts find phrases, and where the target's verdicts teach new ones.

    `PhrasePool` keys phrases by one token; another store (e.g. a suffix structure over the
    context and earlier outputs) can take its place behind these five members without touching
    the proposers or the loop."""

    level: int
    """Phrases are level - 1 tokens long; an n-gram is a key token plus its phrase."""

    def follow(self, context: Sequence[int], count: int, min_seen: int = 1) -> list[Phrase]:
        """Up to `count` phrases that may come right after `context`, most likely first; only those
        learned at least `min_seen` times."""

    def insert(self, key: int, phrase: Sequence[int]) -> None:
        """Learn that `phrase` followed (or should follow) token `key`."""

    def replace(self, key: int, old: Phrase, new: Sequence[int]) -> None:
        """Swap a phrase found wrong for its correction."""

    def insert_ngrams(self, tokens: Sequence[int], start: int = 0) -> None:
        """Learn every n-gram of `tokens` whose key is at index >= start (context phrases)."""


class PhrasePool:
    """Map key token -> up to `capacity` phrases of exactly `level - 1` tokens, oldest first.

    Inserting a phrase that is present moves it to the newest end and counts it once more (a phrase
    seen twice is likelier than a one-off guess); inserting into a full key drops the oldest. A
    pool may be passed to several `generate` calls (warm start); it is not
    thread-safe, so share it between threads only under a lock.
    """

    def __init__(self, level: int = 4, capacity: int = 8):
        if isinstance(level, bool) or not isinstance(level, int) or level < 2:
            raise ConfigError(f"PhrasePool level must be an int >= 2, got {level!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"PhrasePool capacity must be an int >= 1, got {capacity!r}")
        self.level = level
        self.capacity = capacity
        self._phrases: dict[int, OrderedDict[Phrase, int]] = {}
        """key -> phrase -> times inserted, oldest first."""

    def insert(self, key: int, phrase: Sequence[int]) -> None:
        phrase = tuple(phrase)
        if len(phrase) != self.level - 1:
            raise ConfigError(f"a phrase must have level-1 = {self.level - 1} tokens, got {len(phrase)}")
        bucket = self._phrases.setdefault(key, OrderedDict())
        if phrase in bucket:
            bucket[phrase] += 1
            bucket.move_to_end(phrase)
            return
        bucket[phrase] = 1
        if len(bucket) > self.capacity:
            bucket.popitem(last=False)

    def replace(self, key: int, old: Phrase, new: Sequence[int]) -> None:
        """Swap a tried phrase for its correction, which becomes the newest."""
        bucket = self._phrases.get(key)
        if bucket is not None:
            bucket.pop(tuple(old), None)
        self.insert(key, new)

    def follow(self, context: Sequence[int], count: int, min_seen: int = 1) -> list[Phrase]:
        """The `count` newest phrases keyed by the context's last token (inserted >= `min_seen` times)."""
        return self.lookup(context[-1], count, min_seen) if len(context) else []

    def lookup(self, key: int, count: int, min_seen: int = 1) -> list[Phrase]:
        """The `count` newest phrases of `key` inserted at least `min_seen` times, newest first."""
        bucket = self._phrases.get(key)
        if not bucket or count <= 0:
            return []
        seen = (phrase for phrase, times in reversed(bucket.items()) if times >= min_seen)
        return [phrase for phrase, _ in zip(seen, range(count))]

    def seen(self, key: int, phrase: Sequence[int]) -> int:
        """How many times `phrase` was inserted after `key` since it entered the pool (0: not there)."""
        return self._phrases.get(key, {}).get(tuple(phrase), 0)

    def insert_ngrams(self, tokens: Sequence[int], start: int = 0) -> None:
        """Insert every n-gram of `tokens` whose key is at index >= start (context phrases)."""
        n = self.level
        for i in range(max(start, 0), len(tokens) - n + 1):
            self.insert(tokens[i], tokens[i + 1:i + n])

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._phrases.values())

    def __contains__(self, item: tuple[int, Sequence[int]]) -> bool:
        key, phrase = item
        return tuple(phrase) in self._phrases.get(key, ())

    def items(self) -> Iterable[tuple[int, list[Phrase]]]:
        for key, bucket in self._phrases.items():
            yield key, list(bucket)

    def clear(self) -> None:
        self._phrases.clear()

    def state_dict(self) -> dict:
        return {"level": self.level, "capacity": self.capacity,
                "phrases": [[key, [list(p) for p in bucket]] for key, bucket in self._phrases.items()]}

    @classmethod
    def from_state_dict(cls, state: dict) -> PhrasePool:
        try:
            pool = cls(level=state["level"], capacity=state["capacity"])
            for key, phrases in state["phrases"]:
                for phrase in phrases:
                    pool.insert(int(key), [int(t) for t in phrase])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a valid phrase pool state: {exc}") from exc
        return pool

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write the pool as JSON atomically: a crash leaves the old file or the new one, never half."""
        payload = {"format": "ouroboros-phrase-pool/1", "metadata": metadata or {}, **self.state_dict()}
        write_json_atomically(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[PhrasePool, dict]:
        """Read a pool saved by `save`; returns (pool, metadata). Raises ValueError naming the file."""
        try:
            with open(path) as f:
                payload = json.load(f)
            if not isinstance(payload, dict) or payload.get("format") != "ouroboros-phrase-pool/1":
                raise ConfigError("unknown format (expected ouroboros-phrase-pool/1)")
            return cls.from_state_dict(payload), dict(payload.get("metadata") or {})
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"cannot load phrase pool file {os.fspath(path)!r}: {exc}") from exc
