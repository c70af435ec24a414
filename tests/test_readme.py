"""The README's Python example runs as written against a real server.

Only the address changes (the test's server listens on a free port, not
8001). The deployment is the example's shape: ``decide`` over an engine
named ``lightgbm`` with 48 features, the arm in process, thresholds on. A
fresh client with a tight deadline on its first call is the point: connecting
and reading metadata must not count against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ensembles import repository as rep
from ensembles import signal
from setsuna.contract import ExperimentDoc, Target
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models

README = Path(__file__).parents[1] / "README.md"
N_FEATURES = 48


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(5)
    w = {"lightgbm": rng.normal(size=N_FEATURES).astype(np.float32) / 8}
    repo = build_logistic_models(root, w, rng.normal(size=(300, N_FEATURES)).astype(np.float32))
    doc = ExperimentDoc.single("readme", {"control": Target("lightgbm", 1)}, {"control": 1.0})
    (root / "exp.json").write_text(doc.dumps())
    rep.write_router(
        repo,
        root / "exp.json",
        N_FEATURES,
        name="decide",
        in_process=True,
        thresholds=signal.Thresholds(),
    )
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as s:
        yield s


def test_the_readme_has_its_example() -> None:
    (block,) = python_blocks()
    assert "127.0.0.1:8001" in block and "deadline_ms=" in block


def test_the_readme_example_runs_as_written(server: LocalTriton) -> None:
    (block,) = python_blocks()
    code = block.replace("127.0.0.1:8001", server.grpc_url)
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)  # the user's code, as they would run it
    p = scope["p"]
    assert p["signal"].shape == (2, 1) and set(p["signal"].reshape(-1)) <= {-1, 0, 1}  # type: ignore[index]
    assert list(p.served_by) == ["lightgbm:1"] * 2  # type: ignore[attr-defined]
