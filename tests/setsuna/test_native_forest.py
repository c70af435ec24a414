"""Which models setsuna_forest serves, how it is built, and the Python-wrapper fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engines.base import Candidate
from build_engines.repository import build_config
from build_engines.spec import ModelSpec
from setsuna import native_forest

TL2CGEN = {"lib": "tl2cgen-forest.so", "threads": 1}
LLEAVES = {"lib": "lleaves-forest.so", "n_features": 4, "threads": 1}


def _candidate(engine: str, params: dict[str, object]) -> Candidate:
    return Candidate(name=engine, engine=engine, folder=Path(), params=params, local=True)


@pytest.mark.parametrize(
    ("engine", "params", "why"),
    [
        ("tl2cgen", TL2CGEN, ""),
        ("lleaves", LLEAVES, ""),
        (
            "switch",
            {
                "threshold_rows": 8,
                "small": {"engine": "tl2cgen", "params": TL2CGEN},
                "large": {"engine": "lleaves", "params": LLEAVES},
            },
            "",
        ),
        ("onnxruntime", {"file": "model.onnx"}, "engine 'onnxruntime'"),
        (
            "switch",
            {
                "threshold_rows": 8,
                "small": {"engine": "tl2cgen", "params": TL2CGEN},
                "large": {"engine": "onnxruntime", "params": {}},
            },
            "engine 'onnxruntime'",
        ),
        ("switch", {"threshold_rows": 8}, "without small/large"),
        ("tl2cgen", {**TL2CGEN, "threads": 4}, "threads=4"),
        ("gtil", {}, "engine 'gtil'"),
    ],
)
def test_which_engines_the_backend_serves(engine: str, params: dict[str, object], why: str) -> None:
    got = native_forest.unsupported(engine, params)
    assert (got == "") if not why else (why in got), got


def test_the_backend_builds_once_per_source_hash(tmp_path: Path) -> None:
    if native_forest.compiler() is None:
        pytest.skip("no C compiler")
    first = native_forest.build(tmp_path)
    assert (first / native_forest.LIBRARY).is_file()
    assert native_forest.build(tmp_path) == first
    assert oct((tmp_path / "native").stat().st_mode & 0o777) == "0o700"


def test_a_cache_others_may_write_is_refused(tmp_path: Path) -> None:
    if native_forest.compiler() is None:
        pytest.skip("no C compiler")
    (tmp_path / "native").mkdir(mode=0o777)
    (tmp_path / "native").chmod(0o777)
    with pytest.raises(Exception, match="writable by others"):
        native_forest.build(tmp_path)


def test_a_forest_is_published_on_the_backend_and_falls_back_when_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ModelSpec(name="m")
    native, why = native_forest.choose("tl2cgen", TL2CGEN)
    cfg = build_config(spec, (4,), _candidate("tl2cgen", TL2CGEN), "local")
    assert cfg.backend == (native_forest.BACKEND if native else "python"), why
    monkeypatch.setenv(native_forest.ENV, "0")
    assert native_forest.choose("tl2cgen", TL2CGEN) == (False, f"${native_forest.ENV}=0")
    assert build_config(spec, (4,), _candidate("tl2cgen", TL2CGEN), "local").backend == "python"


def test_other_engines_stay_on_the_python_wrapper() -> None:
    cfg = build_config(ModelSpec(name="m"), (4,), _candidate("onnxruntime", {}), "local")
    assert cfg.backend == "python"
