"""A/B/n experiments: which arm (model variant) serves which sticky key.

The experiment file (its reader and writer: :class:`setsuna.contract.ExperimentDoc`)
is JSON, versioned, and validated as a whole before it replaces the one in force::

    {
      "format": 1,
      "name": "trees-ab",
      "salt": "trees-ab-2026-11",
      "arms": {"control": {"model": "lightgbm", "version": 1},
               "treatment": {"model": "xgboost", "version": 1}},
      "shadow": {"model": "mlp", "version": 1},
      "versions": [{"version": 1, "weights": {"control": 0.5, "treatment": 0.5}},
                   {"version": 2, "weights": {"control": 0.8, "treatment": 0.2}}]
    }

A key (a symbol, an account) hashes with the salt to one of
:data:`BUCKETS` buckets (blake2b, so the same on every host and restart,
unlike Python's ``hash``). Each version assigns every bucket to an arm. The
first version lays the arms out in order; each later version starts from the
previous table and moves only as many buckets as its weight change requires:
an arm that shrinks gives up its highest buckets, an arm that grows takes
freed ones. So a weight change moves the minimum share of keys, and between
versions nothing moves at all. Arms pin a model version: the arm a key lands
on names exactly the model and version that answers it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ensembles.keys import KeyCache
from ensembles.watch import decode_json, read_bytes
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import ConfigError

#: Assignment granularity: weights are honoured to 1 / BUCKETS (0.01 %).
BUCKETS: Final = 10_000


@dataclass(frozen=True)
class Experiment:
    """One validated experiment file, with the bucket table of its latest version."""

    name: str
    salt: str
    arms: tuple[str, ...]  # sorted; an arm's index in the table is its position here
    targets: tuple[Target, ...]  # parallel to arms
    shadow: Target | None
    version: int
    weights: Mapping[str, float]
    table: npt.NDArray[np.int16]  # bucket -> arm index

    def arm_index(self, arm: str) -> int:
        try:
            return self.arms.index(arm)
        except ValueError:
            raise ConfigError(
                f"unknown arm {arm!r} in experiment {self.name!r} v{self.version}; "
                f"arms: {', '.join(self.arms)}"
            ) from None

    def bucket(self, key: str | bytes) -> int:
        raw = key.encode() if isinstance(key, str) else key
        digest = hashlib.blake2b(self.salt.encode() + b"\x00" + raw, digest_size=8).digest()
        return int.from_bytes(digest, "little") % BUCKETS

    def assign(
        self, keys: Iterable[str | bytes], cache: KeyCache | None = None
    ) -> npt.NDArray[np.int16]:
        """Arm index of each key; with ``cache``, each distinct key is hashed once while it fits.

        The cache is bound to this experiment: given one last used with
        another, it starts empty.
        """
        keys = list(keys)
        out = np.empty(len(keys), dtype=np.int16)
        if cache is None:
            for i, k in enumerate(keys):
                out[i] = self.table[self.bucket(k)]
            return out
        cache.bind(self)
        for i, k in enumerate(keys):
            raw = k.encode() if isinstance(k, str) else k
            a = cache.get(raw)
            if a is None:
                a = int(self.table[self.bucket(raw)])
                cache.put(raw, a)
            out[i] = a
        return out

    def describe(self) -> str:
        shares = ", ".join(f"{a} {self.weights.get(a, 0.0):.2%}" for a in self.arms)
        return f"experiment {self.name!r} v{self.version}: {shares}"


def quotas(weights: Mapping[str, float], arms: tuple[str, ...]) -> npt.NDArray[np.int64]:
    """Buckets per arm: largest remainder, so they sum to exactly BUCKETS."""
    raw = np.array([weights.get(a, 0.0) * BUCKETS for a in arms])
    base = np.floor(raw).astype(np.int64)
    short = BUCKETS - int(base.sum())
    order = sorted(range(len(arms)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:short]:
        base[i] += 1
    return np.asarray(base, dtype=np.int64)


def next_table(
    previous: npt.NDArray[np.int16] | None, quota: npt.NDArray[np.int64]
) -> npt.NDArray[np.int16]:
    """The table for ``quota`` that moves the fewest buckets away from ``previous``."""
    if previous is None:
        return np.repeat(np.arange(len(quota), dtype=np.int16), quota)
    table = previous.copy()
    freed: list[npt.NDArray[np.intp]] = []
    for arm, want in enumerate(quota):
        mine = np.flatnonzero(table == arm)
        if len(mine) > want:
            freed.append(mine[int(want) :])  # the highest buckets go
    pool = np.sort(np.concatenate(freed)) if freed else np.empty(0, dtype=np.intp)
    start = 0
    for arm, want in enumerate(quota):
        need = int(want) - int(np.count_nonzero(table == arm))
        if need > 0:
            table[pool[start : start + need]] = arm
            start += need
    return table


def parse(doc: Any, *, origin: str = "experiment") -> Experiment:
    """Validate an experiment document (:class:`setsuna.contract.ExperimentDoc`) and lay
    out the bucket table of its latest version; ConfigError says what is wrong and where."""
    return from_doc(ExperimentDoc.from_json(doc, origin=origin))


def from_doc(doc: ExperimentDoc) -> Experiment:
    """The experiment in force for ``doc``: its versions replayed, oldest first."""
    arms = doc.arm_names
    table: npt.NDArray[np.int16] | None = None
    for v in doc.versions:
        table = next_table(table, quotas(v.weights, arms))
    assert table is not None  # a document has at least one version
    targets = tuple(doc.arms[a] for a in arms)
    latest = doc.latest
    return Experiment(
        doc.name, doc.salt, arms, targets, doc.shadow, latest.version, latest.weights, table
    )


def loads(data: bytes, origin: str) -> Experiment:
    """Validate the bytes of an experiment file read from ``origin`` (named in errors)."""
    return parse(decode_json(data, origin, "experiment"), origin=origin)


def load(path: Path) -> Experiment:
    """Read and validate ``path``; ConfigError names the file and the fault."""
    return loads(read_bytes(path), str(path))


def callees(exp: Experiment) -> list[tuple[str, Target]]:
    """Every model the experiment sends rows to, with its role: the arms, then the shadow."""
    out = [(f"arm {a!r}", t) for a, t in zip(exp.arms, exp.targets, strict=True)]
    return out + ([("shadow", exp.shadow)] if exp.shadow is not None else [])
