"""Sticky keys: how long one may be, and a memo of their arms bounded in bytes.

A key is a symbol or an account: a few bytes. The router refuses a longer one
than ``max_key_bytes`` (that request alone, INVALID_ARG naming the limit), and
remembers the arm of each key it has hashed in a :class:`KeyCache` whose size
is counted in bytes, not keys: a stream of distinct large keys cannot grow
the process past ``max_bytes``. When the next key does not fit, the whole
memo is dropped (counted in :attr:`KeyCache.clears`): the hot path stays one
dict lookup, and the keys still in use are hashed again on their next
request (a blake2b, about a microsecond).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from setsuna.errors import InputError

DEFAULT_MAX_KEY_BYTES: Final = 256
DEFAULT_CACHE_BYTES: Final = 16 << 20
#: What one remembered key costs beyond its own bytes: the bytes object's header
#: (33 bytes on CPython 3.11) and its share of the dict's tables (~60 at most).
ENTRY_OVERHEAD_BYTES: Final = 96


def check_lengths(keys: Sequence[bytes], max_bytes: int, where: str) -> None:
    """InputError naming the first key longer than ``max_bytes``."""
    if max(map(len, keys), default=0) <= max_bytes:
        return
    row, n = next((i, len(k)) for i, k in enumerate(keys) if len(k) > max_bytes)
    raise InputError(
        f"{where}: row {row} is {n} bytes; a sticky key (a symbol or an account) is at most "
        f"max_key_bytes={max_bytes} bytes: send a shorter key, or raise the model's max_key_bytes"
    )


class KeyCache:
    """``key -> arm index`` for one experiment, at most ``max_bytes`` (0: remember nothing).

    Bound to one owner (the experiment the arms belong to): :meth:`bind` with
    another drops everything, so an arm of an old version is never served.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0  # what the entries held now cost, by the rule above
        self.peak = 0  # the most they ever cost: never above max_bytes
        self.clears = 0  # times the memo was full and dropped
        self._arms: dict[bytes, int] = {}
        self._owner: object = None

    def __len__(self) -> int:
        return len(self._arms)

    def bind(self, owner: object) -> None:
        if owner is not self._owner:
            self._arms.clear()
            self.bytes, self._owner = 0, owner

    def get(self, key: bytes) -> int | None:
        return self._arms.get(key)

    def put(self, key: bytes, arm: int) -> None:
        size = len(key) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        if self.bytes + size > self.max_bytes:
            self._arms.clear()
            self.bytes = 0
            self.clears += 1
        if key not in self._arms:
            self._arms[key] = arm
            self.bytes += size
            if self.bytes > self.peak:
                self.peak = self.bytes
