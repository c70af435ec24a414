"""A damaged model file exits 2 with a message naming it, never a native abort or segfault.

LightGBM calls ``std::terminate`` on some damaged texts and both libraries
segfault predicting with a tree whose child index points outside it, so each
case runs the real ``python -m build_engines`` in its own process: a crash
there shows up as a negative (signal) status instead of taking pytest down.
The files are real models, then damaged the way a cut-off copy or a bad edit
damages them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
import xgboost as xgb

from build_engines.sources import from_path

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(5)
X = RNG.normal(size=(1200, 6)).astype(np.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(np.int8)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("models")
    params = {"objective": "binary", "num_leaves": 5, "verbose": -1, "num_threads": 1}
    lgb.train(params, lgb.Dataset(X[:800], Y[:800]), num_boost_round=8).save_model(
        str(root / "m.txt")
    )
    xgb_params = {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}
    booster = xgb.train(xgb_params, xgb.DMatrix(X[:800], Y[:800]), num_boost_round=8)
    booster.save_model(str(root / "m.json"))
    booster.save_model(str(root / "m.ubj"))
    return {p.suffix: p.read_bytes() for p in root.iterdir()}


def _tree0(text: str, key: str, value: Callable[[list[str]], list[str]]) -> str:
    """Replace ``key``'s values in Tree=0; drop tree_sizes so LightGBM parses the edit."""

    def edit(m: re.Match[str]) -> str:
        return m.group(1) + " ".join(value(m.group(2).split()))

    text = re.sub(rf"(Tree=0\n(?:.*\n)*?{key}=)([^\n]*)", edit, text, count=1)
    return re.sub(r"^tree_sizes=.*\n", "", text, flags=re.M)


def _sizes(text: str, change: Callable[[list[str]], list[str]]) -> str:
    return re.sub(
        r"^tree_sizes=(.*)$",
        lambda m: "tree_sizes=" + " ".join(change(m.group(1).split())),
        text,
        count=1,
        flags=re.M,
    )


LIGHTGBM: dict[str, Callable[[str], bytes]] = {
    "truncated mid-tree": lambda t: t[: t.index("Tree=3") + 60].encode(),
    "garbage bytes": lambda t: b"tree\n" + bytes(RNG.integers(0, 256, 3000, dtype=np.uint8)),
    "wrong tree count in the header": lambda t: _sizes(t, lambda s: [*s, s[0]]).encode(),
    # count right, offsets wrong: LightGBM's own parser aborts (SIGABRT) on this one
    "tree sizes off": lambda t: _sizes(t, lambda s: [str(int(v) + 7) for v in s]).encode(),
    # parses, then segfaults predicting: a child index past the tree's nodes
    "child index outside the tree": lambda t: _tree0(
        t, "left_child", lambda v: ["77"] * len(v)
    ).encode(),
    "empty file": lambda t: b"",
}


def _xgb_child(data: bytes) -> bytes:
    import json

    model = json.loads(data)
    tree = model["learner"]["gradient_booster"]["model"]["trees"][0]
    tree["left_children"] = [999 if c != -1 else -1 for c in tree["left_children"]]
    return json.dumps(model).encode()


XGBOOST: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "json truncated": (".json", lambda d: d[: len(d) // 2]),
    "ubjson truncated": (".ubj", lambda d: d[: len(d) // 2]),
    "json garbage": (".json", lambda d: bytes(RNG.integers(0, 256, 3000, dtype=np.uint8))),
    # loads, then segfaults predicting
    "json child index outside the tree": (".json", _xgb_child),
}


def _build(tmp_path: Path, model: Path) -> subprocess.CompletedProcess[str]:
    rows = tmp_path / "rows.npy"
    np.save(rows, X[800:])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "build_engines",
            "--model",
            str(model),
            "--name",
            "x",
            "--valid-rows",
            str(rows),
            "--target",
            "local",
            "--out",
            str(tmp_path / "repo"),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def _assert_refused(done: subprocess.CompletedProcess[str], model: Path, repo: Path) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(model) in error, error
    assert "save the model again" in error, error
    assert not repo.exists()


@pytest.mark.parametrize("damage", list(LIGHTGBM))
def test_a_damaged_lightgbm_file_exits_2_naming_it(
    models: dict[str, bytes], tmp_path: Path, damage: str
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(LIGHTGBM[damage](models[".txt"].decode()))
    _assert_refused(_build(tmp_path, bad), bad, tmp_path / "repo")


@pytest.mark.parametrize("damage", list(XGBOOST))
def test_a_damaged_xgboost_file_exits_2_naming_it(
    models: dict[str, bytes], tmp_path: Path, damage: str
) -> None:
    suffix, change = XGBOOST[damage]
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(change(models[suffix]))
    _assert_refused(_build(tmp_path, bad), bad, tmp_path / "repo")


def test_the_messages_say_what_is_wrong(models: dict[str, bytes], tmp_path: Path) -> None:
    from setsuna.errors import SourceError

    text = models[".txt"].decode()
    cases = {
        "cut.txt": (LIGHTGBM["truncated mid-tree"](text), "truncated"),
        "count.txt": (LIGHTGBM["wrong tree count in the header"](text), "9 tree sizes"),
        "offsets.txt": (LIGHTGBM["tree sizes off"](text), "crashed reading it (SIGABRT)"),
        "child.txt": (LIGHTGBM["child index outside the tree"](text), "left_child 77"),
        "child.json": (_xgb_child(models[".json"]), "children 999"),
    }
    for name, (data, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SourceError, match=re.escape(says)):
            from_path(path, name="x")


def test_intact_files_still_load(models: dict[str, bytes], tmp_path: Path) -> None:
    for suffix, data in models.items():
        path = tmp_path / f"m{suffix}"
        path.write_bytes(data)
        source = from_path(path, name="m")
        assert source.schema.n_features == 6
        assert source.reference(X[:4]).shape == (4, 1)
