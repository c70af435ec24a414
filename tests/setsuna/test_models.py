"""``setsuna models list/status`` against a real server: state, reasons, memory, traffic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from setsuna import cli, models
from setsuna.errors import ServerError
from setsuna.server import ADMIN_TOKEN_ENV, LocalTriton, ServerSettings, find_tritonserver
from tests.helpers import build_logistic_models, python_model

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

W = np.random.default_rng(3).normal(size=4).astype(np.float32)
X = np.random.default_rng(4).normal(size=(300, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    find_tritonserver()
    root = tmp_path_factory.mktemp("models")
    repo = build_logistic_models(root, {"alpha": W, "beta": -W}, X)
    # Sealed, then edited: Triton is asked to load it and refuses (UNAVAILABLE + reason).
    broken = python_model(repo, "broken")
    (broken / "1" / "model.py").write_text("raise SystemExit('edited after sealing')\n")
    settings = ServerSettings.on_free_ports(repo, load_models=("alpha", "beta", "broken"))
    with LocalTriton(settings, require_all_models=False) as srv:
        yield srv


def _infer(server: LocalTriton, model: str, n: int) -> None:
    grpc = tritonclient_grpc
    with grpc.InferenceServerClient(server.grpc_url) as client:
        inp = grpc.InferInput("features", [n, 4], "FP32")
        inp.set_data_from_numpy(X[:n])
        client.infer(model, [inp])


def test_every_model_with_its_state_backend_memory_and_traffic(server: LocalTriton) -> None:
    before = {m.name: m for m in models.status(server.grpc_url, server.grpc_admin_headers)}
    _infer(server, "alpha", 3)
    _infer(server, "alpha", 1)
    got = {
        m.name: m
        for m in models.status(server.grpc_url, server.grpc_admin_headers, server_pid=server.pid)
    }
    assert {"alpha", "beta", "broken"} <= set(got)
    alpha, broken = got["alpha"], got["broken"]
    assert alpha.state == "READY" and alpha.serving == ("1",) and alpha.backend == "python"
    assert alpha.requests == before["alpha"].requests + 2  # requests, not rows
    assert alpha.last_use_ms is not None and alpha.stubs >= 1
    assert alpha.memory_mib is not None and alpha.memory_mib > 5  # a stub is tens of MiB
    assert got["beta"].requests == before["beta"].requests
    assert broken.state == "UNAVAILABLE" and broken.serving == ()
    assert any("seal" in v.reason or "sha256" in v.reason for v in broken.versions), broken
    table = models.render(list(got.values()))
    assert "alpha" in table and "version 1 UNAVAILABLE" in table


def test_without_the_admin_token_the_index_is_refused(server: LocalTriton) -> None:
    with pytest.raises(ServerError, match=r"admin API.*SETSUNA_ADMIN_TOKEN"):
        models.status(server.grpc_url, {})


def test_the_cli_lists_as_json_and_refuses_without_a_token(
    server: LocalTriton, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.grpc_url
    monkeypatch.setenv(ADMIN_TOKEN_ENV, server.admin_token)
    assert cli.main(["models", "status", "alpha", "--url", url, "--json"]) == 0
    (alpha,) = json.loads(capsys.readouterr().out)
    assert alpha["name"] == "alpha" and alpha["state"] == "READY"
    assert cli.main(["models", "status", "nope", "--url", url]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "wrong-token")
    assert cli.main(["models", "list", "--url", url]) == 2
    assert "refused the token" in capsys.readouterr().err
    monkeypatch.delenv(ADMIN_TOKEN_ENV)
    assert cli.main(["models", "list", "--url", url]) == 2


def test_a_native_model_is_shown_inside_the_server() -> None:
    m = models.ModelStatus(
        "forest", (models.VersionState("1", "READY", ""),), "setsuna_forest", None, 0, 5, 1
    )
    assert "in server" in models.render([m])


def test_no_server_pid_for_a_repository_nobody_serves(tmp_path: Path) -> None:
    assert models.server_pid_of(tmp_path) is None


def test_no_server_at_the_address_is_a_clear_error() -> None:
    from setsuna.server import free_ports

    (port,) = free_ports(1)  # nothing listens there
    with pytest.raises(ServerError, match=rf"127\.0\.0\.1:{port}"):
        models.status(f"127.0.0.1:{port}", {"k": "v"})
