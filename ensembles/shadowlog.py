"""The shadow log: what the shadow model answered beside the arms, one JSON line per batch.

The router (and ``decide``) copy each batch to the experiment's shadow model
and write one record per batch here, never returning the shadow's answer::

    {"t_ns": ..., "router": "router", "experiment": "trees-ab",
     "experiment_version": 3, "shadow": "lightgbm:2",
     "request_ids": [...], "arms": ["control", ...],
     "models": {"control": "lightgbm:1", ...},     # the target each arm named then
     "primary": [0.61, ...], "score": [0.60, ...],  # or "error": "..."
     "latency_us": {"primary": 212.0, "shadow": 388.0}}

:class:`ShadowLog` writes it. Several instances (processes) append to one
file: each record is ONE ``write`` on an ``O_APPEND`` descriptor, so lines
never interleave, and the file is bounded: past ``max_bytes`` the instance
that notices renames it to ``<file>.1`` (replacing the previous one) under an
``flock`` of the file, and every instance reopens the path when it no longer
names the file it holds. :func:`read` reads both, oldest first, skipping a
torn last line (a writer killed mid-write).

:func:`compare` turns the records into the figures an operator promotes on
(``setsuna models compare``): agreement of the signals both scores give
under the same thresholds, max |Δ| of the scores, and each side's latency.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ensembles import signal

#: Default bound on one shadow log file (the rotated copy doubles it on disk).
MAX_BYTES: Final = 256 << 20


class ShadowLog:
    """Appends records to ``path``; rotates past ``max_bytes``; safe across processes."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        if max_bytes < 4096:
            raise ValueError(f"shadow log max_bytes={max_bytes}: give at least 4096")
        self.path, self.max_bytes = path, max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self._follow()
        os.write(self._fd, line)  # one write per record: O_APPEND keeps lines whole
        if os.fstat(self._fd).st_size >= self.max_bytes:
            self._rotate()

    def _follow(self) -> None:
        """Reopen the path when another instance rotated the file away from us."""
        try:
            same = self.path.stat().st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = self._open()

    def _rotate(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:  # another instance may have rotated it while we waited for the lock
            if (
                self.path.stat().st_ino == os.fstat(self._fd).st_ino
                and os.fstat(self._fd).st_size >= self.max_bytes
            ):
                self.path.replace(self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            pass
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._follow()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read(path: Path) -> Iterator[dict[str, Any]]:
    """Every whole record of ``path.1`` then ``path`` (a torn or foreign line is skipped)."""
    for p in (path.with_name(path.name + ".1"), path):
        try:
            f = p.open("rb")
        except FileNotFoundError:
            continue
        with f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec


@dataclass(frozen=True)
class Comparison:
    """The shadow against the version that answered, on the same rows."""

    shadow: str
    primary: str
    rows: int
    batches: int
    errors: int
    identical_signals: float
    max_abs_diff: float
    mean_abs_diff: float
    primary_p50_us: float
    primary_p99_us: float
    shadow_p50_us: float
    shadow_p99_us: float
    since_ns: int
    until_ns: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    records: Iterable[Mapping[str, Any]],
    shadow: str,
    thresholds: signal.Thresholds,
    *,
    primary_model: str | None = None,
    since_ns: int = 0,
) -> list[Comparison]:
    """Per primary ``model:version``, how the ``shadow`` (``model:version``) compares.

    Only rows answered by a model named ``primary_model`` (any version), when
    given. Signals are judged by ``thresholds`` on both scores; a batch the
    shadow failed counts in ``errors`` and in no other figure.
    """
    prim: dict[str, list[npt.NDArray[np.float32]]] = {}
    shad: dict[str, list[npt.NDArray[np.float32]]] = {}
    lat: dict[str, tuple[list[float], list[float]]] = {}
    batches: dict[str, int] = {}
    errors: dict[str, int] = {}
    span: dict[str, list[int]] = {}
    for rec in records:
        t = int(rec.get("t_ns", 0))
        if rec.get("shadow") != shadow or t < since_ns:
            continue
        arms, models = rec.get("arms", []), rec.get("models", {})
        labels = np.array([str(models.get(a, "?")) for a in arms])
        for label in np.unique(labels).tolist():
            if primary_model is not None and label.split(":")[0] != primary_model:
                continue
            rows = labels == label
            s = span.setdefault(label, [t, t])
            s[0], s[1] = min(s[0], t), max(s[1], t)
            if "score" not in rec:
                errors[label] = errors.get(label, 0) + 1
                continue
            batches[label] = batches.get(label, 0) + 1
            prim.setdefault(label, []).append(np.asarray(rec["primary"], np.float32)[rows])
            shad.setdefault(label, []).append(np.asarray(rec["score"], np.float32)[rows])
            latency = rec.get("latency_us", {})
            p_us, s_us = lat.setdefault(label, ([], []))
            p_us.append(float(latency.get("primary", np.nan)))
            s_us.append(float(latency.get("shadow", np.nan)))
    out = []
    for label in sorted(span):
        if label in prim:
            ps, ss = np.concatenate(prim[label]), np.concatenate(shad[label])
            same = _signals(ps, thresholds) == _signals(ss, thresholds)
            diff = np.abs(ps.astype(np.float64) - ss.astype(np.float64))
            p_lat, s_lat = (np.asarray(v, dtype=np.float64) for v in lat[label])
            figures = (
                float(same.mean()),
                float(diff.max()),
                float(diff.mean()),
                *_quantiles(p_lat),
                *_quantiles(s_lat),
            )
            rows = len(ps)
        else:
            figures, rows = (0.0, float("nan"), float("nan"), *(float("nan"),) * 4), 0
        out.append(
            Comparison(
                shadow,
                label,
                rows,
                batches.get(label, 0),
                errors.get(label, 0),
                *figures,
                since_ns=span[label][0],
                until_ns=span[label][1],
            )
        )
    return out


def _signals(p: npt.NDArray[np.float32], t: signal.Thresholds) -> npt.NDArray[np.int8]:
    """BUY/HOLD/SELL codes; a score outside [0, 1] is its own code (never equal to a trade)."""
    ok = (p >= 0.0) & (p <= 1.0)
    codes = np.full(len(p), 9, dtype=np.int8)
    if ok.any():
        codes[ok] = signal.decide(p[ok], t)[0]
    return codes


def _quantiles(us: npt.NDArray[np.float64]) -> tuple[float, float]:
    us = us[np.isfinite(us)]
    if not len(us):
        return float("nan"), float("nan")
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))
