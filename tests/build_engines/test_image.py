"""``python -m build_engines.image``: the repository the Dockerfile builds inside the image.

The very module the Dockerfile's ``engines`` stage runs is run here, over
three small examples, and its output is served by the real local Triton
(2.51, the image's server version) with the trusted keys it wrote and the
state folder the container ensembles name: the whole stack loads, ``decide``
answers with the arm's own score, and the state lands in the state folder.
What this cannot show: the NGC image's C library (no Docker engine here).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from build_engines import image
from setsuna import model_config, seal
from setsuna.errors import ConfigError, TamperedArtifactError
from setsuna.model_config import CONFIG_NAME
from setsuna.server import LocalTriton
from tests.pgserver import PostgresServer

grpcclient = pytest.importorskip("tritonclient.grpc")

EXAMPLES = ["--small", "--examples", "lightgbm,xgboost,mlp"]
STACK = {"router", "decide", "decision", "signal", "combiner", "selector", "feedback"}


@dataclass(frozen=True)
class Built:
    out: Path
    state: Path
    key_dir: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("image")
    key_dir = root / "tmpfs"
    key_dir.mkdir()
    state = root / "state"
    status = image.main(
        ["--out", str(root / "out"), "--signing-key", str(image.SECRET_KEY),
         "--ephemeral-key-dir", str(key_dir), "--state-dir", str(state), *EXAMPLES]
    )  # fmt: skip
    assert status == 0
    return Built(root / "out", state, key_dir)


def test_the_repository_holds_the_whole_stack_the_backend_and_the_public_key(
    built: Built,
) -> None:
    out = built.out
    assert sorted(p.name for p in out.iterdir()) == ["backends", "models", "trusted_keys"]
    models = {p.parent.name for p in (out / "models").glob(f"*/{CONFIG_NAME}")}
    assert models == STACK | {"lightgbm", "xgboost", "mlp"}
    for name in models:
        model_config.load(out / "models" / name / CONFIG_NAME, name=name)
    assert (out / "backends" / "setsuna_forest" / "libtriton_setsuna_forest.so").is_file()
    # the build-only key is gone; only its public half remains, world-readable, not writable
    assert list(built.key_dir.iterdir()) == []
    keys = seal.trusted_keys(out / "trusted_keys")
    assert len(keys) == 1
    assert stat.S_IMODE((out / "trusted_keys").stat().st_mode) == 0o644
    assert len(image.verify(out / "models", out / "trusted_keys")) == len(models)


def test_the_state_paths_are_under_the_state_folder(built: Built) -> None:
    paths = [
        cfg.parameters[key].string_value
        for f in (built.out / "models").glob(f"*/{CONFIG_NAME}")
        for cfg in [model_config.load(f)]
        for key in ("shadow_log", "outcomes_db")
        if key in cfg.parameters
    ]
    assert len(paths) == 4  # router's and decide's logs, selector's and feedback's DB
    assert all(Path(p).is_relative_to(built.state) for p in paths), paths


def test_a_tampered_version_fails_the_final_verification(built: Built, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(built.out / "models" / "xgboost", copy / "xgboost")
    config = copy / "xgboost" / CONFIG_NAME
    config.write_text(config.read_text() + "# edited after sealing\n")
    with pytest.raises(TamperedArtifactError):
        image.verify(copy, built.out / "trusted_keys")


def _key(path: Path, mode: int) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)
    return key


def test_a_publisher_key_readable_by_others_is_refused_before_any_build(tmp_path: Path) -> None:
    _key(tmp_path / "signing_key", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        image.signing_key_file(tmp_path / "signing_key", tmp_path)


def test_the_publishers_key_is_used_and_trusted_when_given(tmp_path: Path) -> None:
    key = _key(tmp_path / "signing_key", 0o600)
    out = tmp_path / "out"
    status = image.main(
        ["--out", str(out), "--signing-key", str(tmp_path / "signing_key"),
         "--ephemeral-key-dir", str(tmp_path / "nowhere"), "--small", "--examples", "xgboost"]
    )  # fmt: skip
    assert status == 0
    assert set(seal.trusted_keys(out / "trusted_keys")) == {seal.key_id(key.public_key())}
    # engines only: without the three example arms no ensemble is written
    assert {p.name for p in (out / "models").iterdir() if p.is_dir()} == {"xgboost"}
    assert (tmp_path / "signing_key").is_file()  # the publisher's key is left alone


def test_no_key_and_no_tmpfs_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = image.main(
        ["--out", str(tmp_path / "out"), "--ephemeral-key-dir", str(tmp_path / "missing"),
         "--examples", "xgboost"]
    )  # fmt: skip
    assert status == 2
    assert "BuildKit secret" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_build_leaves_no_build_only_key(tmp_path: Path) -> None:
    key_dir = tmp_path / "tmpfs"
    key_dir.mkdir()
    status = image.main(
        ["--out", str(tmp_path / "out"), "--ephemeral-key-dir", str(key_dir),
         "--examples", "no_such_example"]
    )  # fmt: skip
    assert status != 0
    assert list(key_dir.iterdir()) == []


def test_an_existing_repository_is_never_overwritten(built: Built) -> None:
    with pytest.raises(ConfigError, match="empty --out"):
        image.build(
            built.out,
            build_args=["--examples", "xgboost"],
            signing_key=None,
            ephemeral_key_dir=built.key_dir,
            state_dir=built.state,
        )


@pytest.fixture(scope="module")
def served(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    """The image's repository on the real server, trusting only the image's key."""
    log = tmp_path_factory.mktemp("image-log") / "triton.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(seal.TRUSTED_KEYS_ENV, str(built.out / "trusted_keys"))
        with LocalTriton.on_free_ports(built.out / "models", log_path=log) as srv:
            yield srv


def test_the_whole_stack_serves_from_the_image_repository(
    served: LocalTriton, built: Built
) -> None:
    rng = np.random.default_rng(7)
    n = 32
    x = rng.normal(size=(n, 48)).astype(np.float32)
    keys = np.array([[f"sym{i}".encode()] for i in range(n)], dtype=np.object_)
    with grpcclient.InferenceServerClient(served.grpc_url) as c:
        for model in (*STACK, "lightgbm", "xgboost", "mlp"):
            assert c.is_model_ready(model), model
        inputs = [grpcclient.InferInput("features", [n, 48], "FP32"),
                  grpcclient.InferInput("key", [n, 1], "BYTES")]  # fmt: skip
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(keys)
        r = c.infer("decide", inputs)
        score = r.as_numpy("score")[:, 0]
        served_by = [m.decode() for m in r.as_numpy("model")[:, 0]]
        assert set(served_by) <= {"lightgbm:1", "xgboost:1"} and len(set(served_by)) == 2
        for arm in ("lightgbm", "xgboost"):
            rows = [i for i, m in enumerate(served_by) if m == f"{arm}:1"]
            one = grpcclient.InferInput("features", [len(rows), 48], "FP32")
            one.set_data_from_numpy(x[rows])
            direct = c.infer(arm, [one]).as_numpy("score")[:, 0]
            np.testing.assert_allclose(score[rows], direct, rtol=1e-6, atol=1e-6)
        fb = [grpcclient.InferInput("model", [1, 1], "BYTES"),
              grpcclient.InferInput("score", [1, 1], "FP32"),
              grpcclient.InferInput("outcome", [1, 1], "FP32")]  # fmt: skip
        fb[0].set_data_from_numpy(np.array([[b"lightgbm:1"]], dtype=np.object_))
        fb[1].set_data_from_numpy(np.array([[0.9]], dtype=np.float32))
        fb[2].set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
        c.infer("feedback", fb)
    # the run-time state is where the container's volume is, not in the repository
    assert (built.state / "feedback" / "outcomes.db").is_file()
    assert not list((built.out / "models").glob("**/*.db"))


def test_the_sibling_constants_match_the_ensembles() -> None:
    """build_engines calls ensembles by its CLI (siblings import neither): the names agree."""
    from ensembles import __main__ as ensembles_main

    assert (*ensembles_main.ARMS, ensembles_main.SHADOW) == image.STACK_ARMS
    assert image.STATE_DIR == ensembles_main.CONTAINER_STATE_DIR


def test_replicas_can_share_outcomes_in_postgresql_and_a_password_is_refused_first(
    tmp_path: Path, postgres: PostgresServer, capfd: pytest.CaptureFixture[str]
) -> None:
    url = postgres.createdb("image_outcomes")
    key_dir = tmp_path / "tmpfs"
    key_dir.mkdir()
    out = tmp_path / "out"
    status = image.main(
        ["--out", str(out), "--ephemeral-key-dir", str(key_dir), "--outcomes-db", url,
         "--small", "--examples", "lightgbm,xgboost,mlp"]
    )  # fmt: skip
    assert status == 0
    for model in ("selector", "feedback"):
        cfg = model_config.load(out / "models" / model / CONFIG_NAME)
        assert cfg.parameters["outcomes_db"].string_value == url
    with pytest.raises(ConfigError, match="refused") as refused:
        image.build(
            tmp_path / "other",
            build_args=["--examples", "xgboost"],
            signing_key=None,
            ephemeral_key_dir=key_dir,
            state_dir=tmp_path / "state",
            outcomes_db="postgresql://desk:hunter2@db:5432/setsuna",
        )
    err = capfd.readouterr().err
    assert "password" in err and "hunter2" not in err + str(refused.value)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ConfigError, match="refused"):
        image.build(
            tmp_path / "other",
            build_args=["--examples", "xgboost"],
            signing_key=None,
            ephemeral_key_dir=key_dir,
            state_dir=Path("relative/state"),
        )
    assert "give an absolute path" in capfd.readouterr().err
    assert not (tmp_path / "other").exists()
