"""A bounded memo for values worked out per request from what callers send.

Caches on the request path keyed by what the network sends (the raw peer metadata header, or
the labels it decoded to) must stay bounded however many distinct values arrive, and a
caller that sends a new value on every request must not push out the few values the real
callers repeat. A hit must stay one lookup in a plain dict, with nothing written: no recency
stamp, no hit counter.

Two generations give that. New entries go into `recent`; when it is full (`size` entries, or
`chars` characters of key text), its entries become `older`, what `older` held is dropped, and
`recent` starts again empty. A miss in `recent` looks in `older` (`recall`) and puts what it
finds back into `recent`. So an entry used at least once in every generation — every `size`
new entries, whatever they are — stays for good, and one that is not goes after one to two
generations: a flood of distinct values costs the real callers at most one `older` lookup
each per generation, never a new decode. Memory: at most twice `size` entries and twice
`chars` characters of key text (`chars` is counted as the caller says, and approximately
under threads; `size` always holds).

    memo = Memo(512)
    found = memo.recent.get(key)  # the hit: the owner keeps `memo.recent` as its own dict
    if found is None:
        found = memo.recall(key)
        if found is None:
            found = work_out(key)
        memo.keep(key, found, len(key))
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Memo"]

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_CHARS = 1 << 21  # 2 Mi characters of key text per generation


class Memo(Generic[K, V]):
    """Two generations of remembered values: see the module docstring.

    `recent` and `older` are the same two dict objects for the memo's whole life (a full
    `recent` is copied into `older`, then emptied), so an owner may keep `recent` as its own
    attribute and look it up directly.
    """

    __slots__ = ("_chars", "chars", "older", "recent", "size")

    def __init__(self, size: int, chars: int = DEFAULT_CHARS) -> None:
        self.recent: dict[K, V] = {}
        self.older: dict[K, V] = {}
        self.size = max(size, 1)
        self.chars = chars
        self._chars = 0  # characters of key text in `recent`

    def recall(self, key: K) -> V | None:
        """What the previous generation remembered for `key`, if anything (a miss in
        `recent`). The caller `keep`s it again to carry it into the current generation."""
        return self.older.get(key)

    def keep(self, key: K, value: V, chars: int = 0) -> None:
        """Remember `value` for `key` in the current generation; `chars` is the length of the
        text `key` holds (what the entry pins in memory beyond its fixed size)."""
        recent = self.recent
        if recent and (len(recent) >= self.size or self._chars + chars > self.chars):
            older = self.older
            older.clear()
            older.update(recent)
            recent.clear()
            self._chars = 0
        recent[key] = value
        self._chars += chars

    def __len__(self) -> int:
        """Entries remembered, in both generations (a key in both counts twice)."""
        return len(self.recent) + len(self.older)
