"""config.pbtxt read with Triton's own schema: every failure names the file, where, and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from setsuna.errors import ConfigError
from setsuna.model_config import CONFIG_NAME, check_repository, load, parse

VALID = """\
name: "alpha"
backend: "python"
max_batch_size: 8
input [ { name: "features" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def _model(repo: Path, folder: str, config: bytes | None) -> Path:
    (repo / folder / "1").mkdir(parents=True)
    if config is not None:
        (repo / folder / CONFIG_NAME).write_bytes(config)
    return repo / folder / CONFIG_NAME


def test_a_valid_config_parses_into_tritons_message(tmp_path: Path) -> None:
    cfg = load(_model(tmp_path, "alpha", VALID.encode()))
    assert isinstance(cfg, mc.ModelConfig)
    assert cfg.name == "alpha" and cfg.backend == "python" and cfg.max_batch_size == 8
    assert [i.name for i in cfg.input] == ["features"]


def test_a_config_without_a_name_takes_its_folders(tmp_path: Path) -> None:
    text = VALID.replace('name: "alpha"\n', "")
    assert load(_model(tmp_path, "alpha", text.encode())).backend == "python"


def test_a_wrong_field_names_file_line_column_and_field(tmp_path: Path) -> None:
    path = _model(tmp_path, "alpha", VALID.replace("max_batch_size", "max_batch_sise").encode())
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert f"{path}:3:1:" in message
    assert "max_batch_sise" in message and "make build-engines" in message


def test_a_wrong_type_names_its_line_and_column(tmp_path: Path) -> None:
    path = _model(
        tmp_path, "alpha", VALID.replace("max_batch_size: 8", 'max_batch_size: "x"').encode()
    )
    with pytest.raises(ConfigError, match=rf"{path}:3:\d+: .*integer"):
        load(path)


def test_garbage_bytes_name_the_first_bad_byte(tmp_path: Path) -> None:
    path = _model(tmp_path, "alpha", b'name: "alpha"\nbackend: "py\xff\xfe\x00\x01thon"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert f"{path}:2:13:" in message and "0xff" in message and "not UTF-8" in message


def test_binary_noise_is_refused_with_the_file_named(tmp_path: Path) -> None:
    noise = bytes(range(256)) * 4
    with pytest.raises(ConfigError, match=str(tmp_path / "alpha" / CONFIG_NAME)):
        load(_model(tmp_path, "alpha", noise))


def test_a_name_other_than_the_folders_is_refused(tmp_path: Path) -> None:
    path = _model(tmp_path, "beta", VALID.encode())
    with pytest.raises(ConfigError, match=r"name 'alpha' differs from its folder 'beta'"):
        load(path)
    # The folder a staged config will be published as can be given explicitly.
    assert load(path, name="alpha").name == "alpha"


@pytest.mark.parametrize("text", [b"", b"\n  \n", b"# only a comment\n"])
def test_an_empty_config_is_refused(tmp_path: Path, text: bytes) -> None:
    path = _model(tmp_path, "alpha", text)
    with pytest.raises(ConfigError, match=rf"{path} is empty"):
        load(path)


def test_text_parses_without_a_file_too() -> None:
    assert parse(VALID, name="alpha").max_batch_size == 8
    with pytest.raises(ConfigError, match=r"config\.pbtxt:1:\d+: .*Expected"):
        parse("input [ { name: ")


def test_check_repository_names_every_broken_model_and_why(tmp_path: Path) -> None:
    _model(tmp_path, "alpha", VALID.encode())
    _model(tmp_path, "garbled", b"\x00\xff\xfe garbage")
    _model(tmp_path, "typo", VALID.replace("alpha", "typo").replace("backend", "backnd").encode())
    _model(tmp_path, "renamed", VALID.encode())
    _model(tmp_path, "blank", b"")
    _model(tmp_path, "bare", None)
    _model(tmp_path, ".publish.alpha.0123456789abcdef", b"garbage: hidden folders are not models")
    (tmp_path / "notes.txt").write_text("not a model")
    bad = check_repository(tmp_path)
    assert sorted(bad) == ["bare", "blank", "garbled", "renamed", "typo"]
    assert "not UTF-8" in bad["garbled"]
    assert "backnd" in bad["typo"] and ":2:1:" in bad["typo"]
    assert "differs from its folder 'renamed'" in bad["renamed"]
    assert "is empty" in bad["blank"]
    assert "config.pbtxt is missing" in bad["bare"]
    for model, reason in bad.items():
        assert str(tmp_path / model) in reason  # the file, so the reader can open it
        assert "make build-engines" in reason or "rename the folder" in reason


def test_check_repository_of_a_clean_repository_is_empty(tmp_path: Path) -> None:
    _model(tmp_path, "alpha", VALID.encode())
    assert check_repository(tmp_path) == {}
    with pytest.raises(ConfigError, match="not a directory"):
        check_repository(tmp_path / "missing")
