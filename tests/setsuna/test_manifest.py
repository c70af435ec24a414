from __future__ import annotations

from pathlib import Path

import pytest

from setsuna import manifest
from setsuna.errors import ArtifactError, TamperedArtifactError
from setsuna.schema import FeatureSchema


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07engine-bytes")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "aux.bin").write_bytes(b"aux")
    m = manifest.Manifest(
        model="m",
        engine="onnxruntime",
        candidate="onnx",
        task="classification",
        schema=FeatureSchema.tabular(3),
        source={"kind": "onnx", "sha256": "0" * 64},
        files=manifest.hash_folder(tmp_path),
    )
    manifest.write(tmp_path, m)
    return tmp_path


def test_verify_accepts_an_untouched_folder(tmp_path: Path) -> None:
    m = manifest.verify(_folder(tmp_path))
    assert set(m.files) == {"model.onnx", "sub/aux.bin"}
    assert m.schema == FeatureSchema.tabular(3)


def test_a_changed_byte_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 1
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedArtifactError, match=r"model\.onnx.*rebuild"):
        manifest.verify(folder)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "sub" / "aux.bin").unlink()
    with pytest.raises(TamperedArtifactError, match="missing"):
        manifest.verify(folder)


def test_a_planted_file_is_refused_pycache_included(tmp_path: Path) -> None:
    """The stub guard writes no bytecode, so a __pycache__ here was planted (it would run)."""
    folder = _folder(tmp_path)
    (folder / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(TamperedArtifactError, match=r"evil\.so"):
        manifest.verify(folder)
    (folder / "evil.so").unlink()
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    with pytest.raises(TamperedArtifactError, match=r"model\.cpython-311\.pyc"):
        manifest.verify(folder)


def test_missing_or_malformed_manifest_says_to_rebuild(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="build-engines"):
        manifest.verify(tmp_path)
    (tmp_path / manifest.MANIFEST_NAME).write_text('{"format": 99}')
    with pytest.raises(ArtifactError, match="rebuild"):
        manifest.verify(tmp_path)
