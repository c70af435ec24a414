"""The config choices the tuner sweeps, each a :class:`~build_engines.spec.ServingSpec`.

Dynamic batching off (1 and 2 instances); on, with queue delays 0 / 100 /
500 us, preferred batch sizes 8/32/128 or none, 1 / 2 / 4 CPU instances; and
the response cache on. ``default`` (what the builder writes untuned) comes
first: it is the baseline every report compares against. Each variant is a
whole ServingSpec, so what the sweep measures is exactly what the builder
writes once the choice lands in ``tuned.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Final

from build_engines.spec import ServingSpec
from build_engines.tuning.tuned import tuned_knobs

#: ``--quick``: the baseline, batching off, and the two ends of the queue delay.
QUICK_VARIANTS: Final = ("default", "nobatch-2i", "db0-2i", "db500-2i")


@dataclass(frozen=True)
class Variant:
    """One config choice: a name for the reports and the ServingSpec it serves with."""

    name: str
    serving: ServingSpec

    @property
    def dynamic_batching(self) -> bool:
        return self.serving.dynamic_batching

    def knobs(self) -> dict[str, Any]:
        return tuned_knobs(self.serving)

    def describe(self) -> str:
        s = self.serving
        inst = f"{s.cpu_instances} instance{'s' if s.cpu_instances != 1 else ''}"
        if not self.dynamic_batching:
            text = f"batching off, {inst}"
        else:
            pref = "/".join(map(str, s.preferred_batch_sizes)) or "none"
            text = f"batching delay {s.max_queue_delay_us} us, preferred {pref}, {inst}"
        return text + (", cache on" if s.response_cache else "")


def make_variants(base: ServingSpec | None = None) -> list[Variant]:
    """The config choices swept: ``default`` (the builder's, untuned) first, duplicates dropped."""
    r = dataclasses.replace
    # Batching on unless a variant turns it off, whatever ``base`` says.
    b = r(ServingSpec() if base is None else base, dynamic_batching=True)
    off = r(b, response_cache=False)
    every = [
        Variant("default", b),
        Variant("nobatch-1i", r(off, cpu_instances=1, dynamic_batching=False)),
        Variant("nobatch-2i", r(off, cpu_instances=2, dynamic_batching=False)),
        Variant("db0-2i", r(off, max_queue_delay_us=0, cpu_instances=2)),
        Variant("db100-2i", r(off, max_queue_delay_us=100, cpu_instances=2)),
        Variant("db500-2i", r(off, max_queue_delay_us=500, cpu_instances=2)),
        Variant(
            "db100-2i-nopref",
            r(off, max_queue_delay_us=100, preferred_batch_sizes=(), cpu_instances=2),
        ),
        Variant("db100-1i", r(off, max_queue_delay_us=100, cpu_instances=1)),
        Variant("db100-4i", r(off, max_queue_delay_us=100, cpu_instances=4)),
        Variant(
            "db100-2i-cache", r(b, max_queue_delay_us=100, cpu_instances=2, response_cache=True)
        ),
    ]
    out: list[Variant] = []
    seen: set[str] = set()
    for v in every:
        key = json.dumps(v.knobs(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out
