"""The stub guard against a real Triton: planted or overridden code never runs.

Each probe writes a sentinel file if its code runs at all, so "refused" means
"refused before a line of it executed", not only "the load failed". Models
are loaded through the admin API after the server started, as an operator's
publish would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.utils import InferenceServerException

from setsuna import seal
from setsuna.server import LocalTriton
from tests.helpers import IDENTITY_PY, python_model

EVIL = """\
from pathlib import Path
Path({sentinel!r}).write_text("ran")
class TritonPythonModel:
    def execute(self, requests):
        return []
"""

SO_SOURCE = """\
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {{
  FILE *f = fopen("{sentinel}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}
}}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("guarded")
    python_model(repo, "good")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[LocalTriton]:
    with LocalTriton.on_free_ports(
        repo, load_models=("good",), log_path=repo.parent / "triton.log"
    ) as srv:
        yield srv


@pytest.fixture
def client(server: LocalTriton) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _load_refused(
    server: LocalTriton,
    client: grpcclient.InferenceServerClient,
    name: str,
    *,
    serving_before: bool = False,
) -> str:
    """Load ``name``, expect a refusal; a version that served before keeps serving."""
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name, headers=server.grpc_admin_headers)
    assert client.is_model_ready(name) == serving_before
    return str(info.value)


def _sentinel(repo: Path, name: str) -> Path:
    return repo.parent / f"{repo.name}-{name}-ran"


def test_a_sealed_model_serves(
    server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = grpcclient.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("good", [inp]).as_numpy("score"), x)


def test_a_planted_pyc_does_not_run(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    sentinel = _sentinel(repo, "pyc")
    model_dir = python_model(repo, "pyc")
    cache = model_dir / "1" / "__pycache__"
    cache.mkdir()
    evil = model_dir / "evil.py"
    evil.write_text(EVIL.format(sentinel=str(sentinel)))
    # A bytecode file for model.py that the normal import would prefer.
    subprocess.run(
        [
            "python3",
            "-c",
            "import py_compile,sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2])",
            str(evil),
            str(cache / "model.cpython-311.pyc"),
        ],
        check=True,
    )
    evil.unlink()
    reason = _load_refused(server, client, "pyc")
    assert "__pycache__/model.cpython-311.pyc" in reason
    assert not sentinel.exists()


def test_a_planted_extension_module_does_not_run(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the planted library")
    sentinel = _sentinel(repo, "so")
    model_dir = python_model(repo, "so")
    src = repo.parent / "planted.c"
    src.write_text(SO_SOURCE.format(sentinel=sentinel))
    planted = model_dir / "1" / "model.cpython-311-x86_64-linux-gnu.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(planted), str(src)], check=True)
    reason = _load_refused(server, client, "so")
    assert planted.name in reason
    assert not sentinel.exists()


def test_a_planted_package_init_does_not_run(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    sentinel = _sentinel(repo, "init")
    model_dir = python_model(repo, "init")
    (model_dir / "1" / "__init__.py").write_text(EVIL.format(sentinel=str(sentinel)))
    reason = _load_refused(server, client, "init")
    assert "__init__.py" in reason
    assert not sentinel.exists()


def test_a_module_planted_beside_the_versions_is_not_importable(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    """The model folder is on the stub's sys.path: an import must not find a planted file."""
    sentinel = _sentinel(repo, "beside")
    model_dir = python_model(repo, "beside", "import setsuna_optional_plugin\n" + IDENTITY_PY)
    (model_dir / "setsuna_optional_plugin.py").write_text(EVIL.format(sentinel=str(sentinel)))
    reason = _load_refused(server, client, "beside")
    assert "refusing to import 'setsuna_optional_plugin'" in reason
    assert not sentinel.exists()


def test_edited_code_or_config_is_refused(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    sentinel = _sentinel(repo, "edited")
    model_dir = python_model(repo, "edited")
    (model_dir / "1" / "model.py").write_text(EVIL.format(sentinel=str(sentinel)))
    assert "sha256 of model.py" in _load_refused(server, client, "edited")
    python_model(repo, "edited")  # republished: loads again
    client.load_model("edited", headers=server.grpc_admin_headers)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 1", "count: 2"))
    # Triton keeps the loaded instances when a reload fails: the last good one serves.
    assert "config.pbtxt" in _load_refused(server, client, "edited", serving_before=True)
    assert not sentinel.exists()


def test_a_seal_from_an_untrusted_key_is_refused(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    model_dir = python_model(repo, "outsider", seal=False)
    seal.seal_model(model_dir, Ed25519PrivateKey.generate())
    assert "not trusted" in _load_refused(server, client, "outsider")


def test_file_overrides_through_the_api_never_run_code(
    repo: Path, server: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    """Even with the admin key, the repository API's file: overrides load no code."""
    sentinel = _sentinel(repo, "override")
    config = {
        "name": "override",
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    with pytest.raises(InferenceServerException, match="file: overrides are not served"):
        client.load_model(
            "override",
            config=json.dumps(config),
            files={"file:1/model.py": EVIL.format(sentinel=str(sentinel)).encode()},
            headers=server.grpc_admin_headers,
        )
    assert not sentinel.exists()
    assert client.is_model_ready("good")
