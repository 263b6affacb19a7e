"""The two-generation memo behind the request path's caches: bounded, and a flood of new keys
does not push out the keys in use."""

from __future__ import annotations

from meshlib._memo import Memo


def lookup(memo: Memo[str, object], key: str, make: object) -> object:
    """What an owner does per request: the hit, else the older generation, else `make`."""
    found = memo.recent.get(key)
    if found is None:
        found = memo.recall(key)
        if found is None:
            found = make
        memo.keep(key, found, len(key))
    return found


def test_a_key_used_in_every_generation_outlives_any_flood() -> None:
    """A key looked up at least once per `size` new keys is never worked out again, while
    10,000 distinct keys go through; the memo never holds more than twice `size`."""
    memo: Memo[str, object] = Memo(100)
    mine = object()
    assert lookup(memo, "mine", mine) is mine
    for n in range(10_000):
        lookup(memo, f"flood-{n}", object())
        if n % 99 == 0:
            assert lookup(memo, "mine", object()) is mine
        assert len(memo.recent) <= 100 and len(memo) <= 200


def test_a_key_not_used_goes_within_two_generations() -> None:
    """An entry nobody asks for again is dropped after one to two generations of new keys."""
    memo: Memo[str, object] = Memo(10)
    memo.keep("old", object())
    for n in range(20):
        memo.keep(f"new-{n}", object())
    assert memo.recent.get("old") is None and memo.recall("old") is None


def test_the_characters_kept_are_bounded() -> None:
    """Long keys start a new generation before `size` does: at most twice `chars` characters
    of key text are held (give or take the one entry that started the generation)."""
    memo: Memo[str, int] = Memo(1000, chars=10_000)
    for n in range(500):
        key = f"{n:05d}" + "x" * 995
        memo.keep(key, n, len(key))
        held = sum(map(len, memo.recent)) + sum(map(len, memo.older))
        assert held <= 2 * 10_000
    assert len(memo.recent) == 10


def test_recent_is_the_same_dict_for_good() -> None:
    """Owners keep `recent` as their own dict for the hit: a new generation empties it, it
    is never replaced."""
    memo: Memo[int, int] = Memo(2)
    recent = memo.recent
    for n in range(10):
        memo.keep(n, n)
    assert memo.recent is recent and recent == {8: 8, 9: 9} and memo.older == {6: 6, 7: 7}
