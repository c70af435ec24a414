"""``python -m ensembles``: the example layout over three engines, served end to end.

The engines are small logistic models under the example names (lightgbm,
xgboost, mlp), built by the real pipeline; the example ensembles are written
over them and every one answers through the real local Triton.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ensembles.__main__ import main, write_examples
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models

grpcclient = pytest.importorskip("tritonclient.grpc")

N = 5
RNG = np.random.default_rng(21)
W = {m: RNG.normal(size=N).astype(np.float32) for m in ("lightgbm", "xgboost", "mlp")}


def _p(model: str, x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(x.astype(np.float64) @ W[model].astype(np.float64))))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    root = tmp_path_factory.mktemp("examples")
    x = RNG.normal(size=(400, N)).astype(np.float32)
    build_logistic_models(root, W, x)
    assert main(["--model-repository", str(root / "local")]) == 0
    with LocalTriton.on_free_ports(root / "local", log_path=root / "triton.log") as srv:
        yield srv


def _features(x: np.ndarray, keys: list[str] | None = None) -> list[object]:
    inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if keys is not None:
        k = grpcclient.InferInput("key", [len(keys), 1], "BYTES")
        k.set_data_from_numpy(np.array([[s.encode()] for s in keys], dtype=np.object_))
        inputs.append(k)
    return inputs


def test_every_example_ensemble_answers(server: LocalTriton) -> None:
    x = RNG.normal(size=(20, N)).astype(np.float32)
    keys = [f"S{i}" for i in range(20)]
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        decide = c.infer("decide", _features(x, keys))
        decision = c.infer("decision", _features(x, keys))
        combined = c.infer("combiner", _features(x))
        selected = c.infer("selector", _features(x))
    models = [m.decode() for m in decide.as_numpy("model").reshape(-1)]
    assert set(models) <= {"lightgbm:1", "xgboost:1"} and len(set(models)) == 2
    for i, m in enumerate(models):
        assert decide.as_numpy("score")[i, 0] == pytest.approx(_p(m.split(":")[0], x[i]), abs=1e-5)
    np.testing.assert_array_equal(decide.as_numpy("signal"), decision.as_numpy("signal"))
    mean = (_p("lightgbm", x) + _p("xgboost", x) + _p("mlp", x)) / 3
    np.testing.assert_allclose(combined.as_numpy("score").reshape(-1), mean, atol=1e-5)
    assert selected.as_numpy("model")[0, 0].decode() in {"lightgbm:1", "xgboost:1"}


def test_feedback_writes_beside_itself(server: LocalTriton) -> None:
    inputs = [
        grpcclient.InferInput("model", [2, 1], "BYTES"),
        grpcclient.InferInput("score", [2, 1], "FP32"),
        grpcclient.InferInput("outcome", [2, 1], "FP32"),
    ]
    inputs[0].set_data_from_numpy(np.array([[b"lightgbm:1"], [b"lightgbm:1"]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[0.9], [0.2]], dtype=np.float32))
    inputs[2].set_data_from_numpy(np.array([[1.0], [1.0]], dtype=np.float32))
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        r = c.infer("feedback", inputs)
    assert r.as_numpy("accuracy").reshape(-1).tolist() == [0.5, 0.5]
    assert (server.settings.model_repository / "feedback" / "outcomes.db").is_file()


def test_without_engines_it_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model-repository", str(tmp_path)]) == 2
    assert "make build-engines" in capsys.readouterr().err
    with pytest.raises(Exception, match="lacks the example engines"):
        write_examples(tmp_path)
