"""Trading sessions as data: a time zone and the local windows when trading happens.

A session answers two questions for a UTC timestamp: which trading window
(if any) contains it, so bars never span a lunch break or a close, and how
much of the day's trading time has elapsed, a feature. Both are computed
from a fixed UTC offset, which the compiled feature kernel can use without
a time-zone library; a zone whose offset changes (daylight saving) is
refused at construction rather than silently mis-timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from setsuna.errors import ConfigError

NS_PER_MINUTE = 60 * 1_000_000_000
NS_PER_DAY = 24 * 60 * NS_PER_MINUTE


def _minutes(hhmm: str) -> int:
    try:
        hours, minutes = (int(part) for part in hhmm.split(":"))
    except ValueError:
        raise ConfigError(f"session time {hhmm!r} is not HH:MM") from None
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or hours * 60 + minutes > 24 * 60:
        raise ConfigError(f"session time {hhmm!r} is outside 00:00-24:00")
    return hours * 60 + minutes


@dataclass(frozen=True)
class TradingSession:
    """Named trading windows in local time, e.g. TSE ``(("09:00", "11:30"), ("12:30", "15:30"))``.

    Windows are half-open ``[start, end)``, sorted, non-overlapping, within
    one local day. Every day is treated as a trading day: holidays are the
    data's business (a day without ticks makes no bars).
    """

    name: str
    time_zone: str
    windows: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.windows:
            raise ConfigError(f"session {self.name!r} needs at least one window")
        bounds = [(_minutes(a), _minutes(b)) for a, b in self.windows]
        previous_end = 0
        for start, end in bounds:
            if start >= end or start < previous_end:
                raise ConfigError(
                    f"session {self.name!r}: windows must be sorted, non-empty and "
                    f"non-overlapping, got {self.windows}"
                )
            previous_end = end
        try:
            zone = ZoneInfo(self.time_zone)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"unknown time zone {self.time_zone!r}: {exc}") from exc
        offsets = {
            zone.utcoffset(datetime(year, month, 1))
            for year in (1990, 2010, 2030)
            for month in (1, 7)
        }
        if len(offsets) != 1:
            raise ConfigError(
                f"time zone {self.time_zone!r} changes its UTC offset (daylight saving); "
                "sessions need a fixed-offset zone: use the exchange's standard-time zone"
            )

    @property
    def utc_offset_ns(self) -> int:
        offset = ZoneInfo(self.time_zone).utcoffset(datetime(2020, 1, 1)) or timedelta(0)
        return int(offset.total_seconds()) * 1_000_000_000

    def window_bounds_ns(self) -> npt.NDArray[np.int64]:
        """``[[start, end], ...]`` in ns since local midnight: what the kernel consumes."""
        return np.array(
            [[_minutes(a) * NS_PER_MINUTE, _minutes(b) * NS_PER_MINUTE] for a, b in self.windows],
            dtype=np.int64,
        )

    @property
    def trading_ns_per_day(self) -> int:
        bounds = self.window_bounds_ns()
        return int((bounds[:, 1] - bounds[:, 0]).sum())

    def window_of(self, timestamp_ns: int) -> tuple[int, int] | None:
        """The UTC ``(start_ns, end_ns)`` of the window containing ``timestamp_ns``, or None."""
        local = timestamp_ns + self.utc_offset_ns
        midnight = local - local % NS_PER_DAY
        of_day = local - midnight
        for start, end in self.window_bounds_ns().tolist():
            if start <= of_day < end:
                base = midnight - self.utc_offset_ns
                return base + start, base + end
        return None

    def elapsed_fraction(self, timestamp_ns: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Share of the local day's trading time elapsed at each timestamp, in [0, 1].

        Before the open it is 0, during a break it stays at the morning's
        share, after the close it is 1: a value for every instant.
        """
        ts = np.asarray(timestamp_ns, dtype=np.int64)
        of_day = (ts + self.utc_offset_ns) % NS_PER_DAY
        bounds = self.window_bounds_ns()
        elapsed = np.zeros(ts.shape, dtype=np.int64)
        for start, end in bounds.tolist():
            elapsed += np.clip(of_day - start, 0, end - start)
        return elapsed / float(self.trading_ns_per_day)


#: Tokyo Stock Exchange cash equities: morning and afternoon sessions (the
#: afternoon runs to 15:30 since the 2024 extension). Japan has no DST.
TSE = TradingSession("TSE", "Asia/Tokyo", (("09:00", "11:30"), ("12:30", "15:30")))

#: Spot FX as one 24-hour UTC day (weekends are simply absent from the data).
FX24 = TradingSession("FX24", "UTC", (("00:00", "24:00"),))

SESSIONS: dict[str, TradingSession] = {s.name: s for s in (TSE, FX24)}


def get_session(name: str) -> TradingSession:
    """The registered session called ``name`` (``TSE``, ``FX24``)."""
    try:
        return SESSIONS[name]
    except KeyError:
        raise ConfigError(f"unknown session {name!r}; choose one of {sorted(SESSIONS)}") from None
