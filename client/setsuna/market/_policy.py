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
Policy = Literal["raise", "drop"]


def check_policy(policy: str) -> Policy:
    if policy == "raise":
        return "raise"
    if policy == "drop":
        return "drop"
    raise ConfigError(f"policy must be 'raise' or 'drop', got {policy!r}")


@dataclass(slots=True)
class DropCounts:
    """Events skipped, by reason. ``outside_session`` is counted under either policy."""

    bad_value: int = 0
    out_of_order: int = 0
    duplicate: int = 0
    outside_session: int = 0

    @property
    def total(self) -> int:
        return self.bad_value + self.out_of_order + self.duplicate + self.outside_session

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
