"""Read a tree-model file in a child process first: a corrupt file must not kill the build.

LightGBM's parser calls ``std::terminate`` on some damaged model texts (a
tree cut short, a tree count that disagrees with the trees): the build
process aborts (SIGABRT, exit 134) with no Python exception to catch. Both
LightGBM and XGBoost load a tree whose child index points outside it and
then segfault when they predict with it. No in-process guard catches either,
so the file's bytes are first read by a short-lived child interpreter, which
checks the trees' structure, loads them with the library and predicts a few
probe rows. Only when it comes back clean does the build load the *same
bytes* itself; otherwise the child's fate becomes a
:class:`~setsuna.errors.SourceError` naming the file, what is wrong and what
to do (the CLI exits 2 on it, as on every other bad source).

The child runs ``python -m build_engines.sources.vet <kind>`` with the bytes
on stdin; it costs one interpreter start and one load of the model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from setsuna.errors import SourceError

Kind = Literal["lightgbm", "xgboost"]
#: A model that takes longer than this to load and predict a few rows is refused.
TIMEOUT_S = 300.0
_SAVE_HINT = {
    "lightgbm": "save the model again with booster.save_model('model.txt')",
    "xgboost": "save the model again with booster.save_model('model.json') (or '.ubj')",
}
_LIBRARY = {"lightgbm": "LightGBM", "xgboost": "XGBoost"}
_MARK = "setsuna-vet: "


def lightgbm_text(path: Path) -> str:
    """The text of the LightGBM model at ``path``, once a child has read it safely."""
    data = _read(path)
    _vet("lightgbm", path, data)
    return data.decode("utf-8")


def xgboost_bytes(path: Path) -> bytes:
    """The bytes of the XGBoost JSON/UBJSON model at ``path``, once a child has read them."""
    data = _read(path)
    _vet("xgboost", path, data)
    return data


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}; check the path") from exc


def _vet(kind: Kind, path: Path, data: bytes) -> None:
    """Run the child on ``data``; raise SourceError unless it read them cleanly."""
    library = _LIBRARY[kind]
    if not data.strip():
        raise SourceError(f"{path} is empty: it holds no {library} model; {_SAVE_HINT[kind]}")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "build_engines.sources.vet", kind],
            input=data,
            capture_output=True,
            timeout=TIMEOUT_S,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"{path}: {library} took over {TIMEOUT_S:.0f} s to read it and predict a few rows; "
            "the file is damaged or not a model this build can serve"
        ) from None
    if done.returncode == 0:
        return
    err = done.stderr.decode(errors="replace")
    out = done.stdout.decode(errors="replace")
    said = [ln.removeprefix(_MARK) for ln in err.splitlines() if ln.startswith(_MARK)]
    if done.returncode > 0 and said:
        raise SourceError(f"{path} is not a usable {library} model: {said[-1]}; {_SAVE_HINT[kind]}")
    if done.returncode > 0:  # the check itself could not run: not the file's fault
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise SourceError(
            f"cannot check {path}: the checking process {sys.executable} -m "
            f"build_engines.sources.vet failed ({last}); install the build extra "
            "(pip install -e '.[build]') in this environment"
        )
    native = _native_message(out + "\n" + err)
    raise SourceError(
        f"{path} is not a usable {library} model: {library} crashed reading it "
        f"({_signal_name(-done.returncode)})"
        + (f", saying {native!r}" if native else "")
        + f". The file is damaged or truncated; {_SAVE_HINT[kind]}"
    )


def _child_env() -> dict[str, str]:
    """This environment, with this checkout importable and the child single-threaded."""
    import build_engines
    import setsuna

    roots = [str(Path(m.__file__ or "").resolve().parents[1]) for m in (build_engines, setsuna)]
    old = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*roots, *([old] if old else [])]),
        "OMP_NUM_THREADS": "1",
    }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _native_message(text: str) -> str:
    """The library's own last complaint (LightGBM's ``[Fatal]`` line), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if "[Fatal]" in ln or "Check failed" in ln]
    pick = fatal[-1] if fatal else ""
    return pick if len(pick) <= 200 else pick[:197] + "..."


# --- the child --------------------------------------------------------------------------


class _Bad(Exception):
    """What the child found wrong, in words for the user."""


def check_lightgbm(data: bytes) -> None:
    """Structure first (specific messages), then LightGBM's own parser and a prediction."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"byte {exc.start} is not UTF-8 text; a LightGBM model is a text file") from None
    n_features = _lightgbm_structure(text)
    import lightgbm as lgb
    import numpy as np

    try:
        booster = lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as exc:
        raise _Bad(f"LightGBM cannot read it: {exc}") from None
    if booster.num_feature() != n_features:
        raise _Bad(f"it has {booster.num_feature()} features, its header says {n_features}")
    booster.predict(_probe_rows(np, n_features), num_threads=1)


def _lightgbm_structure(text: str) -> int:
    """Check every tree's arrays and child indices; return the number of features.

    These are the faults LightGBM's parser lets through and its predictor
    then follows out of bounds (a segfault), or that it meets with an abort.
    """
    header: dict[str, str] = {}
    trees: list[dict[str, str]] = []
    ended = False
    for raw in text.splitlines():
        line = raw.strip()
        if line == "end of trees":
            ended = True
            break
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "Tree":
            trees.append({"Tree": value})
        elif trees:
            trees[-1][key] = value
        else:
            header[key] = value
    if "max_feature_idx" not in header or "version" not in header:
        raise _Bad("its header lacks version/max_feature_idx: it is not a LightGBM model text")
    n_features = _int(header["max_feature_idx"], "max_feature_idx") + 1
    if not ended:
        raise _Bad(
            f"it ends after {len(trees)} tree(s) without the 'end of trees' line: "
            "the file is truncated"
        )
    if not trees:
        raise _Bad("it holds no trees")
    sizes = header.get("tree_sizes", "").split()
    if sizes and len(sizes) != len(trees):
        raise _Bad(
            f"its header lists {len(sizes)} tree sizes but the file holds {len(trees)} trees"
        )
    for i, tree in enumerate(trees):
        if tree["Tree"] != str(i):
            raise _Bad(f"tree {i} is labelled Tree={tree['Tree']}: trees are missing or repeated")
        _lightgbm_tree(i, tree, n_features)
    return n_features


def _lightgbm_tree(i: int, tree: dict[str, str], n_features: int) -> None:
    where = f"Tree={i}"
    leaves = _int(tree.get("num_leaves", ""), f"{where} num_leaves")
    if leaves < 1:
        raise _Bad(f"{where} has num_leaves={leaves}")
    if len(_numbers(tree, "leaf_value", where, floats=True)) != leaves:
        raise _Bad(f"{where}: leaf_value does not hold num_leaves={leaves} values")
    if leaves == 1:
        return
    nodes = leaves - 1
    for key in ("split_feature", "threshold", "decision_type", "left_child", "right_child"):
        if len(_numbers(tree, key, where, floats=key == "threshold")) != nodes:
            raise _Bad(f"{where}: {key} does not hold {nodes} values (num_leaves - 1)")
    for f in _numbers(tree, "split_feature", where):
        if not 0 <= f < n_features:
            raise _Bad(f"{where} splits on feature {f:g}; the model has {n_features} features")
    for key in ("left_child", "right_child"):
        for c in _numbers(tree, key, where):
            # >= 0: an inner node; < 0: leaf ~c
            if not (0 < c < nodes if c >= 0 else ~int(c) < leaves):
                raise _Bad(f"{where}: {key} {c:g} points outside the tree's {leaves} leaves")


def _numbers(tree: dict[str, str], key: str, where: str, *, floats: bool = False) -> list[float]:
    if key not in tree:
        raise _Bad(f"{where} lacks its {key} line")
    try:
        values = [float(v) for v in tree[key].split()]
    except ValueError:
        raise _Bad(f"{where}: {key} holds something that is not a number") from None
    if not floats and any(v != int(v) for v in values):
        raise _Bad(f"{where}: {key} holds non-integers")
    return values


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _Bad(f"{what}={value!r} is not an integer") from None


def check_xgboost(data: bytes) -> None:
    """Load with XGBoost, check every tree's child and feature indices, then predict."""
    import numpy as np
    import xgboost as xgb

    try:
        booster = xgb.Booster(model_file=bytearray(data))
    except xgb.core.XGBoostError as exc:
        lines = str(exc).strip().splitlines() or ["unknown error"]
        first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0])  # "[12:00:00] src/x.cc:9: "
        raise _Bad(f"XGBoost cannot read it: {first}") from None
    model = json.loads(bytes(booster.save_raw("json")))
    learner = model["learner"]
    n_features = int(learner["learner_model_param"]["num_feature"])
    gb = learner["gradient_booster"]
    trees = gb.get("gbtree", gb).get("model", {}).get("trees", [])  # dart wraps a gbtree
    for i, tree in enumerate(trees):
        _xgboost_tree(i, tree, n_features)
    booster.set_param({"nthread": 1})
    booster.predict(xgb.DMatrix(_probe_rows(np, max(n_features, 1))))


def _xgboost_tree(i: int, tree: dict[str, Any], n_features: int) -> None:
    where = f"tree {i}"
    n = int(tree["tree_param"]["num_nodes"])
    arrays = ("left_children", "right_children", "split_indices", "split_conditions")
    for key in arrays:
        if len(tree.get(key, ())) != n:
            raise _Bad(f"{where}: {key} does not hold num_nodes={n} values")
    left, right, split = tree["left_children"], tree["right_children"], tree["split_indices"]
    for node in range(n):
        lc, rc = int(left[node]), int(right[node])
        if lc == -1 and rc == -1:
            continue
        if not (0 < lc < n and 0 < rc < n):
            raise _Bad(f"{where}, node {node}: children {lc}, {rc} point outside its {n} nodes")
        if not 0 <= int(split[node]) < n_features:
            raise _Bad(
                f"{where}, node {node} splits on feature {split[node]}; the model has "
                f"{n_features} features"
            )


def _probe_rows(np: Any, n_features: int) -> Any:
    """Zeros, ordinary values, extremes and NaN: a few rows that walk many branches."""
    rng = np.random.default_rng(0)
    rows = [
        np.zeros((1, n_features)),
        rng.normal(scale=3.0, size=(64, n_features)),
        np.full((1, n_features), 1e30),
        np.full((1, n_features), -1e30),
        np.full((1, n_features), np.nan),
    ]
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


def main(argv: list[str]) -> int:
    """Child entry point: vet the model bytes on stdin; 0 when usable, 1 with a message."""
    checks = {"lightgbm": check_lightgbm, "xgboost": check_xgboost}
    if len(argv) != 1 or argv[0] not in checks:
        print(
            "usage: python -m build_engines.sources.vet {lightgbm|xgboost}",
            file=sys.stderr,
        )
        return 2
    try:
        checks[argv[0]](sys.stdin.buffer.read())
    except _Bad as exc:
        print(f"{_MARK}{exc}", file=sys.stderr)
        return 1
    except ImportError:
        raise  # the environment's fault, not the file's: a traceback, exit 1, no mark
    except Exception as exc:  # e.g. a JSON model missing its parts, a refused prediction
        print(f"{_MARK}{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
