"""The feature schema: the contract between features, engines and requests.

A schema names every feature in order and fixes the per-row shape, so a model
trained on ``[ret_1, ret_5, ...]`` is never fed a row in another order. It
travels in every manifest, the build uses it to size Triton's ``dims``, and
:meth:`FeatureSchema.check` is the single place a batch is validated before it
reaches an engine (client side, and inside Python-backend models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from setsuna.contract import FEATURES, SCORE
from setsuna.errors import ConfigError, DTypeError, NaNError, ShapeError

#: Tensor names every setsuna model uses (their home: :mod:`setsuna.contract`).
INPUT_NAME = FEATURES
OUTPUT_NAME = SCORE

_SAFE_KINDS = frozenset("fiub")  # float, signed, unsigned, bool: cast to float32


@dataclass(frozen=True)
class FeatureSchema:
    """Names and per-row shape of a model's input.

    ``row_shape`` is ``(n_features,)`` for tabular models and
    ``(steps, n_features)`` for sequence models; ``names`` always lists the
    last axis. ``allow_nan`` is off by default: a NaN reaching a model trained
    without missing values is a data bug, not a prediction.
    """

    names: tuple[str, ...]
    row_shape: tuple[int, ...]
    allow_nan: bool = False
    dtype: str = "float32"
    output_names: tuple[str, ...] = field(default=(OUTPUT_NAME,))

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("a feature schema needs at least one feature name")
        if len(set(self.names)) != len(self.names):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(f"duplicate feature names {dupes}: give every feature a unique name")
        if not self.row_shape or any(d <= 0 for d in self.row_shape):
            raise ConfigError(f"row_shape must be positive dims, got {self.row_shape}")
        if self.row_shape[-1] != len(self.names):
            raise ConfigError(
                f"row_shape {self.row_shape} ends in {self.row_shape[-1]} but "
                f"{len(self.names)} names were given: the last axis is the feature axis"
            )
        if self.dtype != "float32":
            raise ConfigError(f"only float32 features are supported, got {self.dtype!r}")

    @classmethod
    def tabular(
        cls, n_features: int, *, prefix: str = "f", allow_nan: bool = False
    ) -> FeatureSchema:
        """A schema of ``n_features`` generically named columns."""
        return cls(tuple(f"{prefix}{i}" for i in range(n_features)), (n_features,), allow_nan)

    @property
    def n_features(self) -> int:
        return self.row_shape[-1]

    def check(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Return ``x`` as a C-contiguous float32 batch, or raise a typed InputError.

        A single row (shape == row_shape) is promoted to a batch of one. No copy
        is made when ``x`` is already contiguous float32.
        """
        arr = np.asarray(x)
        if arr.dtype.kind not in _SAFE_KINDS:
            raise DTypeError(
                f"features have dtype {arr.dtype}; send a numeric array (float32 preferred)"
            )
        if arr.shape == self.row_shape:
            arr = arr[np.newaxis, ...]
        if arr.ndim != len(self.row_shape) + 1 or arr.shape[1:] != self.row_shape:
            raise ShapeError(
                f"expected a batch of shape [n, {', '.join(map(str, self.row_shape))}] "
                f"({self.n_features} features: {', '.join(self.names[:4])}"
                f"{', ...' if self.n_features > 4 else ''}), got {list(arr.shape)}"
            )
        out = np.ascontiguousarray(arr, dtype=np.float32)
        if not self.allow_nan and not np.isfinite(out).all():
            bad = np.argwhere(~np.isfinite(out))[0]
            raise NaNError(
                f"non-finite value {out[tuple(bad)]} at index {bad.tolist()}: this model was "
                "built without allow_nan; clean or impute the features before inference"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "row_shape": list(self.row_shape),
            "allow_nan": self.allow_nan,
            "dtype": self.dtype,
            "output_names": list(self.output_names),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureSchema:
        try:
            return cls(
                names=tuple(str(n) for n in data["names"]),
                row_shape=tuple(int(d) for d in data["row_shape"]),
                allow_nan=bool(data.get("allow_nan", False)),
                dtype=str(data.get("dtype", "float32")),
                output_names=tuple(data.get("output_names", (OUTPUT_NAME,))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed feature schema {dict(data)!r}: {exc}") from exc


def names_like(names: Sequence[str] | None, n: int, prefix: str = "f") -> tuple[str, ...]:
    """``names`` if given (and of length ``n``), else ``f0..f{n-1}``."""
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(n))
    if len(names) != n:
        raise ConfigError(f"{len(names)} feature names given for {n} features")
    return tuple(names)
