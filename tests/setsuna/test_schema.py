from __future__ import annotations

import numpy as np
import pytest

from setsuna.errors import ConfigError, DTypeError, NaNError, ShapeError
from setsuna.schema import FeatureSchema


def test_check_returns_float32_contiguous_without_copy_when_it_fits() -> None:
    s = FeatureSchema.tabular(3)
    x = np.ones((4, 3), dtype=np.float32)
    assert s.check(x) is x
    y = s.check(np.ones((2, 3), dtype=np.float64))
    assert y.dtype == np.float32 and y.flags.c_contiguous


def test_single_row_is_promoted_to_a_batch() -> None:
    assert FeatureSchema.tabular(3).check([1, 2, 3]).shape == (1, 3)


def test_wrong_feature_count_names_the_expected_shape() -> None:
    with pytest.raises(ShapeError, match=r"\[n, 3\]"):
        FeatureSchema.tabular(3).check(np.ones((2, 4), dtype=np.float32))


def test_sequence_schema_checks_both_axes() -> None:
    s = FeatureSchema(("a", "b"), (5, 2))
    assert s.check(np.zeros((3, 5, 2))).shape == (3, 5, 2)
    with pytest.raises(ShapeError):
        s.check(np.zeros((3, 4, 2)))


def test_string_dtype_is_refused() -> None:
    with pytest.raises(DTypeError, match="numeric"):
        FeatureSchema.tabular(2).check(np.array([["a", "b"]]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_unless_allowed(bad: float) -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    x[1, 2] = bad
    with pytest.raises(NaNError, match=r"\[1, 2\]"):
        FeatureSchema.tabular(3).check(x)
    assert np.isnan(FeatureSchema.tabular(3, allow_nan=True).check(x)[1, 2]) == np.isnan(bad)


def test_schema_round_trips_through_json() -> None:
    s = FeatureSchema(("x", "y"), (4, 2), allow_nan=True)
    assert FeatureSchema.from_json(s.to_json()) == s


@pytest.mark.parametrize(
    ("names", "shape"), [((), (0,)), (("a", "a"), (2,)), (("a", "b"), (3,)), (("a",), (-1,))]
)
def test_invalid_schemas_are_rejected(names: tuple[str, ...], shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        FeatureSchema(names, shape)
