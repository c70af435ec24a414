"""``python -m build_engines`` end to end on a user's file, and its refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from build_engines.__main__ import main
from setsuna import manifest


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1500, 6)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int8)
    params = {"objective": "binary", "num_leaves": 5, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x[:1000], y[:1000]), num_boost_round=8)
    booster.save_model(str(root / "alpha.txt"))
    np.save(root / "holdout.npy", x[1000:])
    (root / "alpha.pkl").write_bytes(pickle.dumps(booster))
    return root / "alpha.txt", root / "holdout.npy"


def test_builds_a_users_lightgbm_file_into_both_targets(
    model_file: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, rows = model_file
    rc = main(
        [
            "--model",
            str(model),
            "--name",
            "alpha",
            "--valid-rows",
            str(rows),
            "--out",
            str(tmp_path / "repo"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "== alpha (latency) ==" in out and "published alpha" in out
    local = manifest.verify(tmp_path / "repo" / "local" / "alpha" / "1")
    container = manifest.verify(tmp_path / "repo" / "container" / "alpha" / "1")
    assert local.source["sha256"] == container.source["sha256"]
    assert container.candidate == "fil"


def test_pickle_needs_the_flag(
    model_file: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, rows = model_file
    rc = main(
        [
            "--model",
            str(rows.parent / "alpha.pkl"),
            "--name",
            "alpha",
            "--valid-rows",
            str(rows),
            "--out",
            str(tmp_path / "repo"),
        ]
    )
    assert rc == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--examples", "lightgbm,catboost"], "unknown examples ['catboost']"),
        (["--model", "x.txt"], "--model needs --name and --valid-rows"),
        (["--min-identical-decisions", "1.5", "--examples", "mlp"], "min_identical_decisions"),
    ],
)
def test_bad_arguments_exit_2_with_advice(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_tuned_settings_reach_the_written_config(
    model_file: tuple[Path, Path], tmp_path: Path
) -> None:
    from build_engines.tuning.tuned import write_tuned
    from setsuna.model_config import CONFIG_NAME
    from setsuna.model_config import parse as parse_config

    model, rows = model_file
    tuned = write_tuned(
        tmp_path / "tuned.json",
        {"alpha": {"serving": {"dynamic_batching": False, "cpu_instances": 3}}},
    )
    argv = [
        "--model",
        str(model),
        "--name",
        "alpha",
        "--valid-rows",
        str(rows),
        "--target",
        "local",
        "--out",
        str(tmp_path / "repo"),
        "--workdir",
        str(tmp_path / "work"),
    ]
    assert main([*argv, "--tuned", str(tuned)]) == 0
    cfg = parse_config((tmp_path / "repo" / "local" / "alpha" / CONFIG_NAME).read_text())
    assert not cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].count == 3
    assert main([*argv, "--tuned", str(tuned), "--no-tuned"]) == 0
    cfg = parse_config((tmp_path / "repo" / "local" / "alpha" / CONFIG_NAME).read_text())
    assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 2
