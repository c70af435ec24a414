"""Which models setsuna_forest serves, how it is built, and the Python-wrapper fallback."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from build_engines.base import Candidate
from build_engines.repository import build_config
from build_engines.spec import ModelSpec
from setsuna import native_forest
from setsuna.errors import ServerError

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


def test_every_triton_function_the_backend_declares_is_exported_by_the_server() -> None:
    # triton_api.h is the project's own declaration of the ABI; the wheel's
    # libtritonserver must define every function it names (Triton loads the
    # backend with RTLD_NOW, so a missing one would refuse the whole backend).
    from setsuna.server import locate_install

    try:
        install = locate_install()
    except ServerError as exc:  # no server wheel: nothing to check against
        pytest.skip(f"no tritonserver: {exc}")
    header = (native_forest.SOURCE_DIR / "triton_api.h").read_text()
    declared = sorted(set(re.findall(r"\b(TRITON(?:SERVER|BACKEND)_[A-Za-z]+)\(", header)))
    assert len(declared) > 30
    lib = next(install.libs.glob("libtritonserver*.so*"))
    exported = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [f for f in declared if f not in exported] == []


def test_without_a_compiler_the_build_says_so_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    monkeypatch.setenv("SETSUNA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ServerError, match="no C compiler"):
        native_forest.build()
    native_forest._built.cache_clear()
    try:
        native, why = native_forest.choose("tl2cgen", TL2CGEN)
        assert not native and "no C compiler" in why
        cfg = build_config(ModelSpec(name="m"), (4,), _candidate("tl2cgen", TL2CGEN), "local")
        assert cfg.backend == "python"
    finally:
        native_forest._built.cache_clear()


def test_a_compile_error_is_reported_with_the_compiler_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native_forest.compiler() is None:
        pytest.skip("no C compiler")
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.c").write_text("int main( {\n")
    monkeypatch.setattr(native_forest, "SOURCE_DIR", src)
    with pytest.raises(ServerError, match=r"(?s)compiling setsuna_forest failed:.*broken\.c"):
        native_forest.build(tmp_path / "cache")
    assert not list((tmp_path / "cache" / "native").glob(".building-*"))  # nothing left behind
