"""Seals: a published folder verifies; every way of changing it after publishing does not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setsuna import manifest, seal
from setsuna.errors import ConfigError, TamperedArtifactError
from setsuna.schema import FeatureSchema
from tests.helpers import python_model


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ed25519PrivateKey]:
    """A private signing key and trust file for this test only."""
    monkeypatch.setenv(seal.SIGNING_KEY_ENV, str(tmp_path / "keys" / "signing_key"))
    monkeypatch.setenv(seal.TRUSTED_KEYS_ENV, str(tmp_path / "keys" / "trusted_keys"))
    yield seal.signing_key()


def _engine_folder(repo: Path) -> Path:
    """A model whose version folder also has an engine file and a manifest."""
    model_dir = python_model(repo, "alpha", seal=False)
    version = model_dir / "1"
    (version / "engine.bin").write_bytes(b"\x01" * 64)
    m = manifest.Manifest(
        model="alpha",
        engine="onnxruntime",
        candidate="onnx",
        task="classification",
        schema=FeatureSchema.tabular(4),
        source={"kind": "onnx", "sha256": "0" * 64},
        files=manifest.hash_folder(version),
    )
    manifest.write(version, m)
    seal.seal_model(model_dir)
    return version


def test_a_sealed_folder_verifies_and_returns_the_model_code(
    tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = _engine_folder(tmp_path)
    verified = seal.verify_version(version)
    assert verified.key_id == seal.key_id(keys.public_key())
    assert verified.model_py == (version / "model.py").read_bytes()
    assert manifest.verify_sealed(version).model == "alpha"


def test_a_rehashed_manifest_is_refused(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = _engine_folder(tmp_path)
    (version / "engine.bin").write_bytes(b"\x02" * 64)
    doc = json.loads((version / "manifest.json").read_text())
    doc["files"]["engine.bin"] = manifest.sha256_file(version / "engine.bin")
    (version / "manifest.json").write_text(json.dumps(doc))
    manifest.verify(version)  # the attacker's re-hash satisfies the manifest alone
    with pytest.raises(TamperedArtifactError, match=r"engine\.bin"):
        manifest.verify_sealed(version)


@pytest.mark.parametrize(
    "planted",
    [
        "__pycache__/model.cpython-311.pyc",
        "model.cpython-311-x86_64-linux-gnu.so",
        "__init__.py",
        "helpers.py",
    ],
)
def test_a_planted_file_is_named(tmp_path: Path, keys: Ed25519PrivateKey, planted: str) -> None:
    version = _engine_folder(tmp_path)
    (version / planted).parent.mkdir(exist_ok=True)
    (version / planted).write_bytes(b"planted")
    with pytest.raises(TamperedArtifactError, match=planted.replace(".", r"\.")):
        seal.verify_version(version)


def test_an_edited_config_is_refused(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = _engine_folder(tmp_path)
    config = version.parent / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 4096"))
    with pytest.raises(TamperedArtifactError, match=r"config\.pbtxt"):
        seal.verify_version(version)


def test_an_edited_seal_breaks_its_signature(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = _engine_folder(tmp_path)
    (version / "model.py").write_text("import os\n")
    doc = json.loads((version / seal.SEAL_NAME).read_text())
    doc["payload"]["files"]["model.py"] = seal.sha256_bytes(b"import os\n")
    (version / seal.SEAL_NAME).write_text(json.dumps(doc))
    with pytest.raises(TamperedArtifactError, match="signature does not match"):
        seal.verify_version(version)


def test_a_seal_by_an_untrusted_key_is_refused(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = _engine_folder(tmp_path)
    seal.seal_version(version, Ed25519PrivateKey.generate())  # re-signed by an outsider
    with pytest.raises(TamperedArtifactError, match="not trusted"):
        seal.verify_version(version)


def test_a_folder_copied_under_another_name_is_refused(
    tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = _engine_folder(tmp_path)
    (tmp_path / "beta").mkdir()
    version.parent.rename(tmp_path / "beta" / "x")
    moved = tmp_path / "beta"
    (moved / "x" / "config.pbtxt").rename(moved / "config.pbtxt")
    (moved / "x" / "1").rename(moved / "1")
    with pytest.raises(TamperedArtifactError, match="not beta/1"):
        seal.verify_version(moved / "1")


def test_a_missing_seal_says_how_to_publish(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    model_dir = python_model(tmp_path, "raw", seal=False)
    with pytest.raises(TamperedArtifactError, match="only sealed folders load"):
        seal.verify_version(model_dir / "1")


def test_a_trust_file_others_can_write_is_refused(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    path = seal.trusted_keys_path()
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        seal.trusted_keys()


def test_the_generated_signing_key_is_private_and_trusted(
    tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    assert seal.signing_key_path().stat().st_mode & 0o077 == 0
    assert seal.key_id(keys.public_key()) in seal.trusted_keys()
    assert seal.trusted_keys_path().stat().st_mode & 0o022 == 0


@pytest.mark.parametrize("name", ["/usr/lib/libc.so.6", "../../evil.so", "sub/dir.so", ""])
def test_engine_files_outside_the_version_folder_are_refused(tmp_path: Path, name: str) -> None:
    """An absolute path in engine_params loaded a library the hashes never covered."""
    from setsuna import runtime
    from setsuna.errors import EngineError

    with pytest.raises(EngineError, match="not a plain file name"):
        runtime.load("tl2cgen", tmp_path, {"lib": name})


def test_an_engine_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    from setsuna import runtime
    from setsuna.errors import EngineError

    (tmp_path / "forest.so").symlink_to("/usr/lib/x86_64-linux-gnu/libc.so.6")
    with pytest.raises(EngineError, match="is a link"):
        runtime.load("tl2cgen", tmp_path, {"lib": "forest.so"})


def test_a_symlinked_directory_is_refused(tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    # rglob does not descend into a linked directory: it must not pass as "a directory".
    version = _engine_folder(tmp_path / "repo")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.cpython-311.pyc").write_bytes(b"planted")
    (version / "__pycache__").symlink_to(outside, target_is_directory=True)
    with pytest.raises(TamperedArtifactError, match="__pycache__"):
        seal.verify_version(version)
