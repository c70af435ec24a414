"""The caller's deadline travels with each request, so the server sheds what cannot make it.

Without a Triton queue policy (with dynamic batching it stalls 2.51's batcher:
:data:`setsuna.model_config.QUEUE_POLICY_STALL`), nothing in Triton bounds how
long a request waits: under overload the queue grows, every request waits
longer, and the server spends its cores computing answers nobody is waiting
for any more. The gRPC deadline a client sets is not passed to a backend, and
the core's per-request ``timeout`` is only enforced by a queue policy.

So the SDK sends its deadline as a request parameter,
:data:`PARAMETER` = the absolute time (``CLOCK_REALTIME``, ns since the
epoch: meaningful across processes and, with synchronised clocks, hosts) by
which the caller needs the answer. A backend asks :class:`Shedder` about each
request before it computes anything: a request whose deadline is nearer than
the time a batch takes (an exponentially weighted mean of the recent batches,
plus a margin) is answered at once with ``UNAVAILABLE`` and a message starting
with :data:`SHED_MARK`, which the SDK turns into a retryable
:class:`~setsuna.errors.OverloadedError`. It is never computed: under overload
the queue drains at the rate of a parameter check, not of an engine call.
A request without the parameter (perf_analyzer, another client) is served as
before.
"""

from __future__ import annotations

import json
import time
from typing import Final

PARAMETER: Final = "setsuna_deadline_ns"
#: First words of a shed request's error message (the SDK matches on them).
SHED_MARK: Final = "setsuna-shed"
#: Time kept for the answer's way back (stub, network) when deciding to shed.
DEFAULT_MARGIN_US: Final = 200.0
#: Weight of the newest batch in the running estimate of a batch's duration.
_EWMA_WEIGHT: Final = 0.2


def parameters(left_s: float, now_ns: int | None = None) -> dict[str, int]:
    """The request parameters that carry a deadline ``left_s`` seconds from now."""
    now = time.time_ns() if now_ns is None else now_ns
    return {PARAMETER: now + int(left_s * 1e9)}


def read(request_parameters: str) -> int | None:
    """The deadline (ns) in a Python-backend request's ``parameters()`` JSON, if any.

    Cheap when absent (a substring test); a malformed value counts as absent
    rather than failing the request: the deadline is advice, not input.
    """
    if PARAMETER not in request_parameters:
        return None
    try:
        value = json.loads(request_parameters).get(PARAMETER)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Shedder:
    """Whether a request can still be answered in time, from how long batches take.

    ``margin_us`` covers what happens after the backend answers (the response
    crossing the stub and the network). The estimate starts at
    ``initial_batch_us`` and follows :meth:`observe`; it is per model instance
    (one stub process), which is what decides how long this batch will take.
    """

    def __init__(
        self, *, margin_us: float = DEFAULT_MARGIN_US, initial_batch_us: float = 500.0
    ) -> None:
        if margin_us < 0 or initial_batch_us < 0:
            raise ValueError("margin_us and initial_batch_us must be >= 0")
        self.margin_ns = margin_us * 1e3
        self.batch_ns = initial_batch_us * 1e3
        #: Requests shed since start (the backend exports it as a metric).
        self.shed = 0

    def too_late(self, deadline_ns: int | None, now_ns: int) -> bool:
        """True when a request due at ``deadline_ns`` would be answered after it."""
        if deadline_ns is None:
            return False
        late = deadline_ns - now_ns < self.batch_ns + self.margin_ns
        self.shed += late
        return late

    def observe(self, batch_ns: float) -> None:
        """Fold the duration of one executed batch into the estimate."""
        self.batch_ns += _EWMA_WEIGHT * (batch_ns - self.batch_ns)

    def message(self, model: str, deadline_ns: int, now_ns: int) -> str:
        left_us = (deadline_ns - now_ns) / 1e3
        return (
            f"{SHED_MARK}: {model}: the caller's deadline is {left_us:.0f} us away and a batch "
            f"takes ~{self.batch_ns / 1e3:.0f} us here; not computed. The server is "
            "overloaded: retry later, slow down or add instances"
        )
