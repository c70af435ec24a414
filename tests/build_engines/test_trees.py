"""Tree sources and candidates: every engine agrees with its source library.

Small models only (30 trees of <= 15 leaves on 10 features), trained once per
module; compiled objects are cached in a per-session temporary directory, so
each lleaves / tl2cgen compile happens once. Agreement is checked on
Hypothesis-drawn float32 rows (values at and next to every split threshold
among them, and NaN for ``allow_nan`` sources) within
``rtol = atol = 1e-5``: ONNX stores thresholds and leaves in float32, so that
is the honest bound for probabilities in (0, 1) and regression values of a
few units; the compiled engines are in fact exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

lgb = pytest.importorskip("lightgbm")
xgb = pytest.importorskip("xgboost")
pytest.importorskip("lleaves")
pytest.importorskip("tl2cgen")
pytest.importorskip("onnxmltools")

from sklearn.ensemble import (  # noqa: E402
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression  # noqa: E402

from build_engines import base, gate  # noqa: E402
from build_engines.candidates import trees as cand  # noqa: E402
from build_engines.sources.trees import from_lightgbm, from_sklearn, from_xgboost  # noqa: E402
from setsuna import runtime  # noqa: E402
from setsuna.errors import (  # noqa: E402
    ConfigError,
    EngineError,
    PickleRefusedError,
    SourceError,
    UnknownModelTypeError,
)
from setsuna.schema import INPUT_NAME, OUTPUT_NAME, FeatureSchema  # noqa: E402

N_FEATURES = 10
TOL = 1e-5
F32 = base.F32


def _data(n: int = 3000, *, nan_share: float = 0.0, seed: int = 3) -> tuple[F32, Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    y_class = (x[:, 0] + x[:, 1] * x[:, 2] - 0.5 * x[:, 3] > 0).astype(np.float32)
    y_reg = (2.0 * x[:, 0] + np.sin(x[:, 1]) + 0.1 * rng.normal(size=n)).astype(np.float32)
    if nan_share:
        x[rng.random(x.shape) < nan_share] = np.nan
    return np.ascontiguousarray(x), y_class, y_reg


def _lgb(y: str, *, nan: bool = False, objective: str = "binary") -> Any:
    x, yc, yr = _data(nan_share=0.1 if nan else 0.0)
    params = {"objective": objective, "num_leaves": 15, "num_threads": 1, "verbose": -1, "seed": 1}
    return lgb.train(params, lgb.Dataset(x, yc if y == "class" else yr), num_boost_round=30)


def _xgb(*, nan: bool = False, objective: str = "binary:logistic") -> Any:
    x, yc, yr = _data(nan_share=0.1 if nan else 0.0)
    label = yc if objective.startswith("binary") else yr
    params = {"objective": objective, "max_depth": 4, "nthread": 1, "seed": 1}
    return xgb.train(params, xgb.DMatrix(x, label=label), num_boost_round=30)


def _sources() -> dict[str, base.Source]:
    x, yc, yr = _data()
    xn, ycn, _ = _data(nan_share=0.1)
    n = N_FEATURES
    return {
        "lgb": from_lightgbm(_lgb("class"), name="lgb"),
        "lgb_nan": from_lightgbm(_lgb("class", nan=True), name="lgb_nan", allow_nan=True),
        "lgb_reg": from_lightgbm(_lgb("reg", objective="regression"), name="lgb_reg"),
        "xgb": from_xgboost(_xgb(), name="xgb"),
        "xgb_nan": from_xgboost(_xgb(nan=True), name="xgb_nan", allow_nan=True),
        "xgb_reg": from_xgboost(_xgb(objective="reg:squarederror"), name="xgb_reg"),
        "rf": from_sklearn(
            RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0).fit(x, yc),
            name="rf",
            n_features=n,
        ),
        "hgb_reg": from_sklearn(
            HistGradientBoostingRegressor(max_iter=20, random_state=0).fit(x, yr),
            name="hgb_reg",
            n_features=n,
        ),
        "hgb_nan": from_sklearn(
            HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(xn, ycn),
            name="hgb_nan",
            n_features=n,
            allow_nan=True,
        ),
        # Fitted without NaN but served with NaN: sklearn sends NaN down a default side.
        "rf_nan": from_sklearn(
            RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x, yc),
            name="rf_nan",
            n_features=n,
            allow_nan=True,
        ),
        "logreg": from_sklearn(LogisticRegression().fit(x, yc), name="logreg", n_features=n),
    }


#: Candidates each source must yield (others must be Skipped with a reason).
EXPECTED = {
    "lgb": {"onnx", "lleaves", "tl2cgen", "fil"},
    "lgb_nan": {"onnx", "lleaves", "tl2cgen", "fil"},
    "lgb_reg": {"onnx", "lleaves", "tl2cgen", "fil"},
    "xgb": {"onnx", "tl2cgen", "fil"},
    "xgb_nan": {"onnx", "tl2cgen", "fil"},
    "xgb_reg": {"onnx", "tl2cgen", "fil"},
    "rf": {"onnx", "tl2cgen", "fil"},
    "hgb_reg": {"onnx", "tl2cgen", "fil"},
    "hgb_nan": {"onnx", "tl2cgen", "fil"},
    # skl2onnx does not follow sklearn's NaN side for a forest fitted without NaN:
    # the gate's NaN probe must skip it (see test_nan_probe_skips_...).
    "rf_nan": {"tl2cgen", "fil"},
    "logreg": {"onnx"},
}
CASES = [(s, c) for s, names in EXPECTED.items() for c in sorted(names)]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="module")
def sources() -> dict[str, base.Source]:
    return _sources()


@pytest.fixture(scope="module")
def built(
    sources: dict[str, base.Source], cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, base.Built]]:
    calib = _data(512, seed=9)[0]
    root = tmp_path_factory.mktemp("candidates")
    # As build.evaluate runs them: the converter, then the gate's NaN probe.
    return {
        name: {
            b.name: b
            for b in gate.screen_nan(
                cand.convert(src, root / name, calib, cache_dir=cache_dir), src, calib
            )
        }
        for name, src in sources.items()
    }


def _engine(c: base.Candidate) -> runtime.Engine:
    kind, params = (c.engine, c.params) if c.engine else (c.gate_engine, c.gate_params)
    return runtime.load(kind, c.folder, params)


def _thresholds(src: base.Source) -> list[float]:
    """The model's split thresholds (as stored, possibly float64)."""
    model = src.model
    if src.kind == "lightgbm":
        found: list[float] = []
        stack = [t["tree_structure"] for t in model.dump_model()["tree_info"]]
        while stack:
            node = stack.pop()
            if "threshold" in node:
                found.append(float(node["threshold"]))
                stack += [node["left_child"], node["right_child"]]
        return found
    if src.kind == "xgboost":
        trees = json.loads(bytes(model.save_raw(raw_format="json")))["learner"]
        trees = trees["gradient_booster"]["model"]["trees"]
        return [
            float(v)
            for t in trees
            for v, left in zip(t["split_conditions"], t["left_children"], strict=True)
            if left != -1
        ]
    if hasattr(model, "estimators_") and hasattr(model.estimators_[0], "tree_"):
        return [float(v) for e in model.estimators_ for v in e.tree_.threshold if v != -2.0]
    return []


def _edges(src: base.Source) -> list[float]:
    """float32 values at and around every threshold: where engines round differently."""
    out: set[float] = set()
    with np.errstate(over="ignore"):
        for t in _thresholds(src):
            f = np.float32(t)
            if np.isfinite(f):
                down, up = np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))
                out.update(float(v) for v in (down, f, up))
    return sorted(out)


def _rows(src: base.Source) -> st.SearchStrategy[Any]:
    elements: st.SearchStrategy[float] = st.floats(-4.0, 4.0, width=32)
    edges = _edges(src)
    if edges:
        elements = st.one_of(elements, st.sampled_from(edges))
    if src.schema.allow_nan:
        elements = st.one_of(elements, st.just(float("nan")))
    shape = st.tuples(st.integers(1, 8), st.just(src.schema.n_features))
    return hnp.arrays(np.float32, shape, elements=elements)


def test_every_engine_that_applies_is_reported(built: dict[str, dict[str, base.Built]]) -> None:
    for source, results in built.items():
        assert set(results) >= {"onnx", "onnx-int8"}, source
        made = {n for n, b in results.items() if isinstance(b, base.Candidate)}
        assert made == EXPECTED[source], (
            source,
            {n: getattr(b, "reason", "") for n, b in results.items()},
        )
        for b in results.values():
            if isinstance(b, base.Skipped):
                assert b.reason, (source, b.name)


def test_folders_hold_only_their_files(built: dict[str, dict[str, base.Built]]) -> None:
    files = {
        "onnx": {"model.onnx"},
        "lleaves": {"lleaves-forest.so"},
        "tl2cgen": {"tl2cgen-forest.so"},
    }
    fil = {"lgb": {"model.txt"}, "xgb": {"xgboost.json"}, "rf": {"checkpoint.tl"}}
    for source, results in built.items():
        for b in results.values():
            if not isinstance(b, base.Candidate):
                continue
            present = {p.name for p in b.folder.iterdir()}
            expected = (
                fil.get(source.split("_")[0], {"checkpoint.tl"})
                if b.name == "fil"
                else files[b.name]
            )
            assert present == expected, (source, b.name)
            assert b.folder.name == b.name


def test_no_candidate_file_can_shadow_a_python_module(
    built: dict[str, dict[str, base.Built]],
) -> None:
    """Version folders also hold the Python backend's model.py: a ``model.so``
    (or any importable name) next to it would be imported instead of it."""
    from importlib.machinery import all_suffixes

    for results in built.values():
        for b in results.values():
            if isinstance(b, base.Candidate):
                for path in b.folder.iterdir():
                    for suffix in all_suffixes():
                        stem = path.name.removesuffix(suffix)
                        assert stem == path.name or not stem.isidentifier(), path


@pytest.mark.parametrize(("source", "candidate"), CASES)
def test_candidate_agrees_with_source_library(
    source: str,
    candidate: str,
    sources: dict[str, base.Source],
    built: dict[str, dict[str, base.Built]],
) -> None:
    src = sources[source]
    c = built[source][candidate]
    assert isinstance(c, base.Candidate), getattr(c, "reason", c)
    engine = _engine(c)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(x=_rows(src))
    def agrees(x: F32) -> None:
        got = engine.predict(x)
        assert got.dtype == np.float32
        assert got.shape == (len(x), 1)
        np.testing.assert_allclose(got, src.reference(x), rtol=TOL, atol=TOL)

    agrees()


@pytest.mark.parametrize("source", ["lgb", "lgb_reg", "xgb", "rf"])
def test_every_engine_splits_like_the_source_at_every_threshold(
    source: str, sources: dict[str, base.Source], built: dict[str, dict[str, base.Built]]
) -> None:
    """Each threshold (and its float32 neighbours) in each column: no branch may flip.

    LightGBM thresholds are float64; onnxmltools rounds them to the nearest
    float32, which flips rows sitting on the rounded value unless the build
    rounds them down (exact_lightgbm_thresholds).
    """
    src = sources[source]
    edges = np.array(_edges(src), dtype=np.float32)
    base_rows = _data(len(edges), seed=13)[0]
    for candidate in EXPECTED[source]:
        c = built[source][candidate]
        assert isinstance(c, base.Candidate)
        engine = _engine(c)
        for j in range(N_FEATURES):
            x = base_rows.copy()
            x[:, j] = edges
            np.testing.assert_allclose(
                engine.predict(x), src.reference(x), rtol=TOL, atol=TOL, err_msg=candidate
            )


def test_engines_score_real_rows_batched(
    sources: dict[str, base.Source], built: dict[str, dict[str, base.Built]]
) -> None:
    """A 512-row batch (one native call) matches row-by-row and the reference."""
    for source, results in built.items():
        src = sources[source]
        x = _data(512, seed=11, nan_share=0.1 if src.schema.allow_nan else 0.0)[0]
        expected = src.reference(x)
        for c in results.values():
            if isinstance(c, base.Candidate):
                engine = _engine(c)
                batch = engine.predict(x)
                np.testing.assert_allclose(batch, expected, rtol=TOL, atol=TOL)
                single = np.vstack([engine.predict(x[i : i + 1]) for i in range(4)])
                # ORT sums a batch in another order than one row: 1 ulp apart at most.
                np.testing.assert_allclose(single, batch[:4], rtol=1e-6, atol=1e-7)


def test_onnx_file_follows_the_contract(built: dict[str, dict[str, base.Built]]) -> None:
    import onnx
    import onnxruntime as ort

    for source, results in built.items():
        c = results["onnx"]
        if not isinstance(c, base.Candidate):
            continue
        assert c.engine == "onnxruntime" and c.local
        assert c.params == {"file": "model.onnx", "threads": 1, "optimized_offline": True}
        assert c.container == base.ContainerSpec("model.onnx", platform="onnxruntime_onnx")
        model = onnx.load(str(c.folder / "model.onnx"))
        (inp,) = model.graph.input
        (out,) = model.graph.output
        assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME, source
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        in_dims = inp.type.tensor_type.shape.dim
        assert in_dims[0].dim_param and in_dims[1].dim_value == N_FEATURES
        out_dims = out.type.tensor_type.shape.dim
        assert out_dims[0].dim_param and out_dims[1].dim_value == 1
        domains = [o.domain for o in model.opset_import]
        assert set(domains) <= {"", "ai.onnx.ml"} and len(set(domains)) == len(domains), source
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            str(c.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        (score,) = session.run(None, {INPUT_NAME: _data(5)[0]})
        assert score.shape == (5, 1) and score.dtype == np.float32


def test_nan_probe_skips_engines_that_treat_nan_differently(
    built: dict[str, dict[str, base.Built]],
) -> None:
    skipped = built["rf_nan"]["onnx"]
    assert isinstance(skipped, base.Skipped)
    assert "rows with NaN" in skipped.reason and "predict_proba" in skipped.reason
    kept = built["rf_nan"]["tl2cgen"]
    assert isinstance(kept, base.Candidate)
    assert not (kept.folder.parent / "onnx").exists()  # a skipped engine leaves no files


def test_int8_is_skipped_with_the_reason(built: dict[str, dict[str, base.Built]]) -> None:
    skipped = built["lgb"]["onnx-int8"]
    assert isinstance(skipped, base.Skipped)
    assert "TreeEnsemble" in skipped.reason


def test_compiled_candidates_and_fil_spec(built: dict[str, dict[str, base.Built]]) -> None:
    lleaves = built["lgb"]["lleaves"]
    assert isinstance(lleaves, base.Candidate) and lleaves.container is None
    assert lleaves.params["lib"] == "lleaves-forest.so" and lleaves.params["threads"] == 1
    assert lleaves.params["n_features"] == N_FEATURES
    tl = built["xgb"]["tl2cgen"]
    assert isinstance(tl, base.Candidate) and tl.container is None
    assert tl.params == {"lib": "tl2cgen-forest.so", "threads": 1}
    fil = built["xgb"]["fil"]
    assert isinstance(fil, base.Candidate)
    assert fil.engine == "" and not fil.local and fil.gate_engine == "gtil"
    assert fil.container is not None and fil.container.backend == "fil"
    assert fil.container.default_model_filename == "xgboost.json"
    assert fil.container.parameters["model_type"] == "xgboost_json"
    assert fil.container.parameters["output_class"] == "true"
    reg = built["lgb_reg"]["fil"]
    assert isinstance(reg, base.Candidate) and reg.container is not None
    assert reg.container.parameters["output_class"] == "false"
    assert reg.container.parameters["model_type"] == "lightgbm"


def test_tl2cgen_predictor_fallback_agrees(
    sources: dict[str, base.Source], built: dict[str, dict[str, base.Built]]
) -> None:
    """threads > 1 goes through tl2cgen.Predictor; it must score the same."""
    for source in ("lgb_nan", "rf"):
        c = built[source]["tl2cgen"]
        assert isinstance(c, base.Candidate)
        x = _data(64, seed=5, nan_share=0.1 if sources[source].schema.allow_nan else 0.0)[0]
        fast = runtime.load("tl2cgen", c.folder, c.params).predict(x)
        pool = runtime.load("tl2cgen", c.folder, {**c.params, "threads": 2}).predict(x)
        np.testing.assert_allclose(pool, fast, rtol=1e-6, atol=1e-7)


def test_compiles_are_cached_by_model_hash(
    sources: dict[str, base.Source],
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lleaves
    import tl2cgen

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("recompiled although the cache holds the object")

    monkeypatch.setattr(tl2cgen, "generate_c_code", boom)
    monkeypatch.setattr(lleaves.Model, "compile", boom)
    calib = _data(64)[0]
    results = {
        b.name: b for b in cand.convert(sources["lgb"], tmp_path, calib, cache_dir=cache_dir)
    }
    assert isinstance(results["lleaves"], base.Candidate), results["lleaves"]
    assert isinstance(results["tl2cgen"], base.Candidate), results["tl2cgen"]
    assert len(list((cache_dir / "lleaves").glob("*.so"))) >= 2
    assert len(list((cache_dir / "tl2cgen").glob("*.so"))) >= 2


def test_loaders_never_compile_at_serve_time(
    built: dict[str, dict[str, base.Built]], tmp_path: Path
) -> None:
    c = built["lgb"]["lleaves"]
    assert isinstance(c, base.Candidate)
    with pytest.raises(EngineError, match="never compiles"):
        runtime.load("lleaves", tmp_path, c.params)
    assert not any(tmp_path.iterdir())
    with pytest.raises(EngineError, match="compiled for a CPU"):
        runtime.load("lleaves", c.folder, {**c.params, "cpu_flags_sha256": "0123456789abcdef"})
    with pytest.raises(EngineError, match="rebuild"):  # a manifest from before the link step
        runtime.load("lleaves", c.folder, {"model_file": "model.txt", "object_file": "model.o"})


def test_lleaves_library_equals_lleaves_itself(
    sources: dict[str, base.Source], built: dict[str, dict[str, base.Built]], tmp_path: Path
) -> None:
    """The linked library is lleaves' own machine code: bit-identical to Model.predict."""
    import lleaves

    c = built["lgb_nan"]["lleaves"]
    assert isinstance(c, base.Candidate)
    path = tmp_path / "model.txt"
    path.write_text(sources["lgb_nan"].model.model_to_string())
    model = lleaves.Model(model_file=str(path))
    model.compile(fblocksize=cand.LLEAVES_BLOCKSIZE)
    x = _data(300)[0]
    x[::7, 3] = np.nan
    want = model.predict(x.astype(np.float64), n_jobs=1).astype(np.float32).reshape(-1, 1)
    for threads in (1, 3):
        engine = runtime.load("lleaves", c.folder, {**c.params, "threads": threads})
        np.testing.assert_array_equal(engine.predict(x), want)


def test_sha256_is_stable_and_tracks_the_model(tmp_path: Path) -> None:
    booster = _lgb("class")
    first = from_lightgbm(booster, name="a")
    assert from_lightgbm(booster, name="b").sha256 == first.sha256
    path = tmp_path / "model.txt"
    booster.save_model(str(path))
    assert from_lightgbm(path, name="c").sha256 == first.sha256
    assert from_lightgbm(_lgb("reg", objective="regression"), name="d").sha256 != first.sha256

    xbooster = _xgb()
    xfirst = from_xgboost(xbooster, name="x")
    assert from_xgboost(xbooster, name="y").sha256 == xfirst.sha256
    for suffix in ("json", "ubj"):
        xpath = tmp_path / f"model.{suffix}"
        xbooster.save_model(str(xpath))
        assert from_xgboost(xpath, name=suffix).sha256 == xfirst.sha256, suffix

    x, yc, _ = _data()
    rf = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(x, yc)
    assert (
        from_sklearn(rf, name="r", n_features=N_FEATURES).sha256
        == from_sklearn(rf, name="s", n_features=N_FEATURES).sha256
    )


def test_sources_load_from_files(tmp_path: Path) -> None:
    x = _data(200, seed=4)[0]
    booster = _lgb("class")
    path = tmp_path / "model.txt"
    booster.save_model(str(path))
    src = from_lightgbm(path, name="lgb")
    assert src.task == "classification" and src.kind == "lightgbm"
    assert src.reference_label == "lightgbm.Booster.predict"
    np.testing.assert_allclose(src.reference(x)[:, 0], booster.predict(x), rtol=1e-6)

    xbooster = _xgb()
    for suffix in ("json", "ubj"):
        xpath = tmp_path / f"model.{suffix}"
        xbooster.save_model(str(xpath))
        xsrc = from_xgboost(xpath, name=suffix)
        out = xsrc.reference(x)
        assert out.shape == (200, 1) and out.dtype == np.float32
        np.testing.assert_allclose(out[:, 0], xbooster.inplace_predict(x), rtol=1e-6)


def test_sklearn_wrappers_and_tasks() -> None:
    x, yc, yr = _data(1000)
    clf = lgb.LGBMClassifier(n_estimators=10, num_leaves=7, verbose=-1).fit(x, yc)
    assert from_lightgbm(clf, name="c").task == "classification"
    reg = xgb.XGBRegressor(n_estimators=10, max_depth=3).fit(x, yr)
    src = from_xgboost(reg, name="r")
    assert src.task == "regression"
    np.testing.assert_allclose(src.reference(x[:50])[:, 0], reg.predict(x[:50]), rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y3: from_lightgbm(
            lgb.train(
                {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1},
                lgb.Dataset(x, y3),
                num_boost_round=3,
            ),
            name="m",
        ),
        lambda x, y3: from_xgboost(
            xgb.train(
                {"objective": "multi:softprob", "num_class": 3, "nthread": 1},
                xgb.DMatrix(x, label=y3),
                num_boost_round=3,
            ),
            name="m",
        ),
        lambda x, y3: from_sklearn(
            RandomForestClassifier(n_estimators=3, max_depth=3).fit(x, y3),
            name="m",
            n_features=N_FEATURES,
        ),
    ],
    ids=["lightgbm", "xgboost", "sklearn"],
)
def test_multiclass_sources_score_every_class(make: Callable[[F32, Any], base.Source]) -> None:
    """Once refused as out of scope; now class probabilities (see test_multiclass.py)."""
    x = _data(600)[0]
    y3 = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    src = make(x, y3)
    assert src.classes == ("0", "1", "2") and src.reference(x[:5]).shape == (5, 3)


def test_bad_inputs_raise_setsuna_errors(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(b"not read")
    with pytest.raises(PickleRefusedError, match="never unpickles"):
        from_lightgbm(pickled, name="p")
    with pytest.raises(SourceError, match="does not exist"):
        from_xgboost(tmp_path / "missing.json", name="m")
    text = tmp_path / "model.bin"
    text.write_bytes(b"\x00\x01")
    with pytest.raises(SourceError, match="json"):
        from_xgboost(text, name="b")
    with pytest.raises(UnknownModelTypeError):
        from_lightgbm(object(), name="o")  # type: ignore[arg-type]
    with pytest.raises(UnknownModelTypeError, match="not supported"):
        from_xgboost(_xgb(objective="binary:logitraw"), name="raw")
    with pytest.raises(ConfigError, match="n_features"):
        x, yc, _ = _data(200)
        from_sklearn(LogisticRegression().fit(x, yc), name="lr", n_features=3)


def test_feature_names_come_from_the_model() -> None:
    x, yc, _ = _data(500)
    names = [f"ret_{i}" for i in range(N_FEATURES)]
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1},
        lgb.Dataset(x, yc, feature_name=names),
        num_boost_round=3,
    )
    assert from_lightgbm(booster, name="n").schema.names == tuple(names)
    assert from_lightgbm(_lgb("class"), name="g").schema == FeatureSchema.tabular(N_FEATURES)
    with pytest.raises(ConfigError, match="differ"):
        from_lightgbm(booster, name="n", feature_names=list(reversed(names)))


def test_named_xgboost_features_convert(cache_dir: Path, tmp_path: Path) -> None:
    """Real feature names are kept in the schema and do not confuse the converters."""
    x, yc, _ = _data(500)
    names = [f"ret_{i}" for i in range(N_FEATURES)]
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(x, label=yc, feature_names=names),
        num_boost_round=5,
    )
    src = from_xgboost(booster, name="named")
    assert src.schema.names == tuple(names)
    for b in cand.convert(src, tmp_path, x[:64], cache_dir=cache_dir):
        if b.name != "onnx-int8":
            assert isinstance(b, base.Candidate), b
            got = _engine(b).predict(x[:64])
            np.testing.assert_allclose(got, src.reference(x[:64]), rtol=TOL, atol=TOL)


def test_convert_refuses_non_tree_sources(sources: dict[str, base.Source], tmp_path: Path) -> None:
    src = sources["lgb"]
    torch_like = base.Source(
        name="t",
        kind="torch",
        model=None,
        schema=src.schema,
        task="classification",
        sha256="0" * 64,
        reference=src.reference,
        reference_label="torch",
    )
    with pytest.raises(SourceError, match="lightgbm"):
        cand.convert(torch_like, tmp_path, _data(8)[0])


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cand.CACHE_ENV, str(tmp_path))
    assert cand.default_cache_dir() == tmp_path
    monkeypatch.delenv(cand.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = cand.default_cache_dir()  # setsuna's one cache root, shared with the server
    assert root == tmp_path / "xdg" / "setsuna"
    assert root.stat().st_mode & 0o777 == 0o700  # the server refuses a root others may write
