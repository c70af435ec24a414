"""What happens to a bad, late or repeated event: raise, or drop and count.

Either way nothing is reordered or repaired in place; a feed or builder that
drops keeps a :class:`DropCounts` a monitor can read and alert on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from setsuna.errors import ConfigError

#: ``"raise"``: refuse the event with a typed error (the default: data bugs
#: surface). ``"drop"``: skip it and count it under its reason.
OnBadRows = Literal["raise", "drop"]


def check_on_bad_rows(on_bad_rows: str) -> OnBadRows:
    if on_bad_rows == "raise":
        return "raise"
    if on_bad_rows == "drop":
        return "drop"
    raise ConfigError(f"on_bad_rows must be 'raise' or 'drop', got {on_bad_rows!r}")


@dataclass(slots=True)
class DropCounts:
    """Events skipped, by reason. ``outside_session`` is counted under either on_bad_rows."""

    bad_value: int = 0
    out_of_order: int = 0
    duplicate: int = 0
    outside_session: int = 0

    @property
    def total(self) -> int:
        return self.bad_value + self.out_of_order + self.duplicate + self.outside_session

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
