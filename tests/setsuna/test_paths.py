"""The one cache root: ``$SETSUNA_CACHE_DIR`` wins, then XDG, then ``~/.cache``."""

from __future__ import annotations

from pathlib import Path

import pytest

from setsuna import paths, server


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_home_cache_when_nothing_is_set(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "setsuna"


def test_xdg_cache_home_is_honoured(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "xdg" / "setsuna"


def test_setsuna_cache_dir_wins_over_xdg(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    clean_env.setenv(paths.CACHE_ENV, str(tmp_path / "mine"))
    assert paths.cache_root() == tmp_path / "mine"  # used as given: no "setsuna" appended


def test_empty_variables_count_as_unset(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(paths.CACHE_ENV, "")
    clean_env.setenv("XDG_CACHE_HOME", "")
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "setsuna"


def test_nothing_is_created(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(paths.CACHE_ENV, str(tmp_path / "later"))
    paths.cache_root()
    assert not (tmp_path / "later").exists()


def test_the_server_uses_the_same_root(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(paths.CACHE_ENV, str(tmp_path / "mine"))
    assert server._setsuna_cache() == paths.cache_root()
    assert server._cache_root() == tmp_path / "mine" / "triton-backends"


def test_pid_files_live_in_the_runtime_dir_else_in_the_cache_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert paths.runtime_root() == tmp_path / "run" / "setsuna"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("SETSUNA_CACHE_DIR", str(tmp_path / "cache"))
    assert paths.runtime_root() == tmp_path / "cache" / "run"
