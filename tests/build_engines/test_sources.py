"""The source dispatcher: files by suffix, objects by library, pickles refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from build_engines.sources import from_object, from_path, load_rows
from setsuna.errors import PickleRefusedError, SourceError, UnknownModelTypeError

RNG = np.random.default_rng(2)
X = RNG.normal(size=(400, 5)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int8)


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    params = {"objective": "binary", "num_leaves": 4, "verbose": -1, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(X, Y), num_boost_round=3)


def test_lightgbm_text_file_by_suffix(booster: lgb.Booster, tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    booster.save_model(str(path))
    src = from_path(path, name="m")
    assert src.kind == "lightgbm" and src.schema.n_features == 5
    np.testing.assert_allclose(src.reference(X)[:, 0], booster.predict(X), atol=1e-6)


def test_pickle_is_refused_without_the_flag(booster: lgb.Booster, tmp_path: Path) -> None:
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(booster))
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        from_path(path, name="m")


def test_pickle_with_the_flag_warns_and_loads(booster: lgb.Booster, tmp_path: Path) -> None:
    path = tmp_path / "m.joblib"
    import joblib

    joblib.dump(booster, path)
    with pytest.warns(UserWarning, match="executes code"):
        src = from_path(path, name="m", allow_pickle=True)
    assert src.kind == "lightgbm"


def test_unknown_file_type_lists_what_is_supported(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(UnknownModelTypeError, match="LightGBM"):
        from_path(path, name="m")


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        from_path(tmp_path / "nope.txt", name="m")


def test_unknown_object_type_is_refused() -> None:
    with pytest.raises(UnknownModelTypeError, match="dict"):
        from_object({"weights": [1, 2]}, name="m")


def test_unfitted_sklearn_and_torch_without_example_are_refused() -> None:
    import torch
    from sklearn.ensemble import RandomForestClassifier

    with pytest.raises(SourceError, match="not fitted"):
        from_object(RandomForestClassifier(), name="m")
    with pytest.raises(SourceError, match="example input"):
        from_object(torch.nn.Linear(5, 1), name="m")


def test_object_dispatch_by_library(booster: lgb.Booster) -> None:
    from sklearn.linear_model import LogisticRegression

    assert from_object(booster, name="m").kind == "lightgbm"
    assert from_object(LogisticRegression().fit(X, Y), name="m").kind == "sklearn"


def test_rows_never_unpickle(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", X)
    assert load_rows(tmp_path / "ok.npy").dtype == np.float32
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SourceError, match="float32"):
        load_rows(tmp_path / "obj.npy")
