"""LocalTriton against the real ``tritonserver`` from the nvidia-pytriton wheel.

No mocks: the point is to pin down how *this* binary behaves (flags it
accepts, the restricted-API header, the stub seeing the venv). One
module-scoped server serves the happy-path tests; the broken-model test
starts its own, because a failing explicit load kills the server.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from setsuna import seal
from setsuna.errors import ConfigError, ServerError
from setsuna.server import (
    ADMIN_HEADER,
    LocalTriton,
    ServerSettings,
    admin_token,
    find_tritonserver,
    free_ports,
    main,
)

try:
    find_tritonserver()
except ServerError as exc:  # pragma: no cover - CI without the serve extra
    pytest.skip(f"no tritonserver: {exc}", allow_module_level=True)

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CONFIG = """\
backend: "python"
max_batch_size: 8
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 4 ] }} ]
{extra}
"""

# `import setsuna` proves the stub embeds the venv (editable install included):
# the tensor names come from setsuna.schema, so the model cannot load without it.
IDENTITY_PY = """\
import triton_python_backend_utils as pb_utils

from setsuna.schema import INPUT_NAME, OUTPUT_NAME


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT_NAME, x.copy())]))
        return responses
"""

BROKEN_PY = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken-model-sentinel")

    def execute(self, requests):
        return []
"""


def _model(repo: Path, name: str, code: str, *, cached: bool = False) -> None:
    (repo / name / "1").mkdir(parents=True)
    extra = "response_cache { enable: true }" if cached else ""
    (repo / name / "config.pbtxt").write_text(CONFIG.format(extra=extra))
    (repo / name / "1" / "model.py").write_text(code)
    seal.seal_model(repo / name)  # the stub guard loads only sealed folders


def _settings(repo: Path, **kw: object) -> ServerSettings:
    return ServerSettings.on_free_ports(repo, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    repo = tmp_path_factory.mktemp("repo")
    _model(repo, "identity", IDENTITY_PY, cached=True)
    _model(repo, "spare", IDENTITY_PY)  # loaded/unloaded by the admin tests
    # HTTP on: this module pins the HTTP frontend's behaviour too (off by default).
    srv = LocalTriton(_settings(repo, http=True), log_path=repo.parent / "triton.log")
    with srv:
        yield srv
    assert not srv.running


BATCH = np.arange(12, dtype=np.float32).reshape(3, 4) / 7


def test_loads_every_model_folder_by_default(server: LocalTriton) -> None:
    assert server.settings.models == ("identity", "spare")
    assert server.startup_s is not None and server.startup_s < server.ready_timeout_s


def test_http_infer_echoes(server: LocalTriton) -> None:
    with httpclient.InferenceServerClient(server.http_url) as client:
        inp = httpclient.InferInput("features", list(BATCH.shape), "FP32")
        inp.set_data_from_numpy(BATCH)
        result = client.infer("identity", [inp])
    np.testing.assert_array_equal(result.as_numpy("score"), BATCH)


def test_grpc_infer_echoes(server: LocalTriton) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        inp = grpcclient.InferInput("features", list(BATCH.shape), "FP32")
        inp.set_data_from_numpy(BATCH)
        result = client.infer("spare", [inp])
    np.testing.assert_array_equal(result.as_numpy("score"), BATCH)


def test_http_model_repository_needs_admin_header(server: LocalTriton) -> None:
    with httpclient.InferenceServerClient(server.http_url) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("spare")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        wrong = {ADMIN_HEADER: "x" * 32}
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("spare", headers=wrong)
        assert client.is_model_ready("spare")  # nothing above took effect

        client.unload_model("spare", headers=server.admin_headers)
        assert not client.is_model_ready("spare")
        client.load_model("spare", headers=server.admin_headers)
        assert client.is_model_ready("spare")


def test_grpc_model_repository_needs_admin_metadata(server: LocalTriton) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("spare")
        assert client.is_model_ready("spare")
        # The HTTP header name is not enough over gRPC: 2.51 wants a prefixed key.
        with pytest.raises(InferenceServerException, match="triton-grpc-protocol-admin-key"):
            client.unload_model("spare", headers=server.admin_headers)
        client.unload_model("spare", headers=server.grpc_admin_headers)
        assert not client.is_model_ready("spare")
        client.load_model("spare", headers=server.grpc_admin_headers)
        assert client.is_model_ready("spare")


def test_logging_api_is_restricted(server: LocalTriton) -> None:
    with httpclient.InferenceServerClient(server.http_url) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_log_settings()
        assert "log_verbose_level" in client.get_log_settings(headers=server.admin_headers)


def _metrics(server: LocalTriton) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=10) as resp:
        return str(resp.read().decode())


def _metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert m, f"{name} for {model} not in metrics"
    return float(m.group(1))


def test_metrics_and_response_cache(server: LocalTriton) -> None:
    row = np.full((1, 4), 0.25, dtype=np.float32)
    with httpclient.InferenceServerClient(server.http_url) as client:
        for _ in range(2):  # same request twice: the second is a cache hit
            inp = httpclient.InferInput("features", [1, 4], "FP32")
            inp.set_data_from_numpy(row)
            np.testing.assert_array_equal(client.infer("identity", [inp]).as_numpy("score"), row)
    text = _metrics(server)
    assert _metric(text, "nv_inference_request_success", "identity") >= 2
    # Without --cache-config this would stay absent/0 and nothing would complain.
    assert _metric(text, "nv_cache_num_hits_per_model", "identity") >= 1


def test_server_not_reachable_beyond_bind_address(server: LocalTriton) -> None:
    assert server.http_url.startswith("127.0.0.1:")
    assert "--http-address=127.0.0.1" in server.command
    assert all(server.admin_token not in part for part in server.command)


def test_broken_model_fails_start_when_all_are_required(tmp_path: Path) -> None:
    _model(tmp_path / "repo", "broken", BROKEN_PY)
    srv = LocalTriton(_settings(tmp_path / "repo"), log_path=tmp_path / "triton.log")
    with pytest.raises(ServerError, match="broken-model-sentinel") as info:
        srv.start()
    assert "models failed to load: broken" in str(info.value)
    assert not srv.running
    srv.stop()  # idempotent after a failed start


def test_a_broken_model_leaves_the_others_serving_and_readiness_says_which(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    _model(repo, "broken", BROKEN_PY)
    _model(repo, "identity", IDENTITY_PY)
    srv = LocalTriton(
        _settings(repo, http=True), log_path=tmp_path / "triton.log", require_all_models=False
    )
    with srv:
        assert set(srv.unavailable) == {"broken"}
        assert "broken-model-sentinel" in srv.unavailable["broken"]
        with httpclient.InferenceServerClient(srv.http_url) as client:
            assert client.is_server_ready()
            assert client.is_model_ready("identity")
            assert not client.is_model_ready("broken")
            inp = httpclient.InferInput("features", list(BATCH.shape), "FP32")
            inp.set_data_from_numpy(BATCH)
            np.testing.assert_array_equal(client.infer("identity", [inp]).as_numpy("score"), BATCH)


def test_port_in_use_is_refused_before_starting(server: LocalTriton) -> None:
    clash = ServerSettings(
        server.settings.model_repository,
        http_port=free_ports(1)[0],
        grpc_port=server.settings.grpc_port,
        metrics_port=free_ports(1)[0],
        load_models=(),
    )
    with pytest.raises(ServerError, match="in use"):
        LocalTriton(clash).start()


# ------------------------------------------------------------------ settings (no server)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    (tmp_path / ".hidden").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"http_port": 0}, "http_port"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"metrics_port": 8000}, "must differ"),
        ({"cache_size_bytes": -1}, "cache_size_bytes"),
        ({"max_input_size_bytes": 0}, "max_input_size_bytes"),
        ({"max_input_size_bytes": 2**31}, "max_input_size_bytes"),
        ({"bind_address": "0.0.0.0"}, "allow_remote_bind"),
        ({"bind_address": "::"}, "allow_remote_bind"),
        ({"bind_address": "localhost"}, "not an IP address"),
        ({"load_models": ("m3",)}, "not folders"),
        ({"load_models": ("m1", "m1")}, "twice"),
        ({"restricted_apis": ("logging",)}, "model-repository"),
        ({"restricted_apis": ("model-repository", "everything")}, "unknown"),
        ({"admin_header": "Admin Key"}, "admin_header"),
        ({"log_verbose": -1}, "log_verbose"),
        ({"exit_timeout_s": -5}, "exit_timeout_s"),
    ],
)
def test_settings_reject(repo: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerSettings(repo, **kw)  # type: ignore[arg-type]


def test_settings_reject_missing_and_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        ServerSettings(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no model folders"):
        ServerSettings(tmp_path)
    assert ServerSettings(tmp_path, load_models=()).models == ()


def test_settings_defaults_and_flags(repo: Path) -> None:
    s = ServerSettings(repo)
    assert s.models == ("m1", "m2")
    flags = s.flags(token="${SETSUNA_ADMIN_TOKEN}")
    assert flags == [
        "--model-control-mode=explicit",
        "--load-model=m1",
        "--load-model=m2",
        "--strict-readiness=false",
        "--exit-on-error=false",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=5",
        "--allow-http=false",
        "--grpc-address=127.0.0.1",
        "--grpc-port=8001",
        "--allow-metrics=true",
        "--metrics-address=127.0.0.1",
        "--metrics-port=8002",
        "--metrics-config=summary_latencies=true",
        "--grpc-restricted-protocol=model-repository,logging,trace,shared-memory"
        ":admin-key=${SETSUNA_ADMIN_TOKEN}",
        "--cache-config=local,size=268435456",
        "--log-verbose=0",
    ]
    http = ServerSettings(repo, http=True).flags(token="${SETSUNA_ADMIN_TOKEN}")
    assert http == [
        "--model-control-mode=explicit",
        "--load-model=m1",
        "--load-model=m2",
        "--strict-readiness=false",
        "--exit-on-error=false",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=5",
        "--http-address=127.0.0.1",
        "--http-port=8000",
        "--http-restricted-api=model-repository,logging,trace,shared-memory"
        ":admin-key=${SETSUNA_ADMIN_TOKEN}",
        "--grpc-address=127.0.0.1",
        "--grpc-port=8001",
        "--allow-metrics=true",
        "--metrics-address=127.0.0.1",
        "--metrics-port=8002",
        "--metrics-config=summary_latencies=true",
        "--grpc-restricted-protocol=model-repository,logging,trace,shared-memory"
        ":admin-key=${SETSUNA_ADMIN_TOKEN}",
        "--http-max-input-size=67108864",
        "--cache-config=local,size=268435456",
        "--log-verbose=0",
    ]
    assert not any(str(repo) in f for f in flags)
    assert "--cache-config" not in " ".join(ServerSettings(repo, cache_size_bytes=0).flags())
    assert ServerSettings(repo, bind_address="0.0.0.0", allow_remote_bind=True).bind_address


def test_admin_token_from_env_is_validated(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generated = admin_token()
    assert generated == admin_token()  # one per process
    monkeypatch.setenv("SETSUNA_ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError, match="SETSUNA_ADMIN_TOKEN"):
        admin_token()
    monkeypatch.setenv("SETSUNA_ADMIN_TOKEN", "a" * 20)
    assert admin_token() == "a" * 20
    with pytest.raises(ConfigError, match="admin token"):
        ServerSettings(repo).flags(token="a:b")


# ------------------------------------------------------------------ CLI (make serve)


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    _model(tmp_path / "repo", "identity", IDENTITY_PY)
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, SETSUNA_ADMIN_TOKEN="t" * 24)
    argv = [sys.executable, "-m", "setsuna.server", "--model-repository", str(tmp_path / "repo")]
    argv += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    argv += ["--log-file", str(tmp_path / "triton.log")]
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # blocks until the banner (or the process exits)
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        banner = "".join(lines)
        assert f"127.0.0.1:{grpc}" in banner, banner
        assert "HTTP     off" in banner
        assert "token from $SETSUNA_ADMIN_TOKEN" in banner
        assert "t" * 24 not in banner  # a token from the environment is never printed
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as client:
            assert client.is_model_ready("identity")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopping" in rest
    with pytest.raises(ConnectionRefusedError):  # the server went with the CLI
        socket.create_connection(("127.0.0.1", grpc), timeout=5).close()


def test_cli_one_server_per_repository_and_stop_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make serve` twice on one repository: refused; `make stop`: ends that server only."""
    _model(tmp_path / "repo", "identity", IDENTITY_PY)
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, SETSUNA_ADMIN_TOKEN="t" * 24, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    repo = ["--model-repository", str(tmp_path / "repo")]
    argv = [sys.executable, "-m", "setsuna.server", *repo]
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    with subprocess.Popen(
        [*argv, *ports], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the banner (or the process exits)
            if line.startswith("Press Ctrl-C"):
                break
        other = [str(p) for p in free_ports(3)]
        second = subprocess.run(
            [*argv, "--http-port", other[0], "--grpc-port", other[1], "--metrics-port", other[2]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert f"(pid {proc.pid}) already serves" in second.stderr
        stop = subprocess.run(
            [*argv, "--stop"], env=env, capture_output=True, text=True, timeout=90
        )
        assert stop.returncode == 0, stop.stderr
        assert f"stopped setsuna.server pid {proc.pid}" in stop.stdout
        assert proc.wait(timeout=5) == 0  # --stop returned once it had stopped
    with pytest.raises(ConnectionRefusedError):  # tritonserver went with it
        socket.create_connection(("127.0.0.1", grpc), timeout=5).close()
    again = subprocess.run([*argv, "--stop"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "no setsuna.server serves" in again.stdout


def test_cli_bad_settings_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model-repository", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_large_http_body_does_not_kill_the_server(server: LocalTriton) -> None:
    """2.51 copies an HTTP body onto a thread stack: 4 MiB crashed it at ulimit -s 8192.

    LocalTriton sizes the child's stack for ``max_input_size_bytes``; this pins
    that an 8 MiB request (valid JSON, padded) is served and the server lives.
    """
    doc = b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    body = doc + b" " * (8 * 2**20)
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/identity/infer", data=body, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=60) as resp:
        assert resp.status == 200
    assert server.running
