"""``python -m ensembles --target container`` and deploy/container/Dockerfile.

The container ensembles are written over engines built by the real pipeline
(setsuna's Python-backend layout, which the ensembles call by ``features`` /
``score``), every ``config.pbtxt`` is parsed by Triton's schema, every model
they name is in the repository, and their writable state is under the
volume path. The Dockerfile's base image is compared with compose's. No image
is built and no container is run here (no Docker engine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import image
from ensembles.__main__ import CONTAINER_STATE_DIR, main
from setsuna import model_config
from setsuna.compose import BASE_IMAGE, CONTAINER_REPOSITORY, IMAGE
from setsuna.model_config import CONFIG_NAME
from tests.helpers import build_logistic_models

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
N = 5
RNG = np.random.default_rng(16)
W = {m: RNG.normal(size=N).astype(np.float32) for m in ("lightgbm", "xgboost", "mlp")}
ENSEMBLES = {"router", "decide", "decision", "signal", "combiner", "selector", "feedback"}
PATH_PARAMETERS = ("shadow_log", "outcomes_db")


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same engines twice: one repository per target, ensembles written over each."""
    out = {}
    x = RNG.normal(size=(200, N)).astype(np.float32)
    for target in ("local", "container"):
        root = tmp_path_factory.mktemp(target)
        repo = build_logistic_models(root, W, x)
        assert main(["--target", target, "--model-repository", str(repo)]) == 0
        out[target] = repo
    return out


def _configs(repo: Path) -> dict[str, mc.ModelConfig]:
    return {
        p.parent.name: model_config.parse(p.read_text(), origin=str(p))
        for p in sorted(repo.glob(f"*/{CONFIG_NAME}"))
    }


def test_every_container_config_parses_under_tritons_schema(repos: dict[str, Path]) -> None:
    configs = _configs(repos["container"])
    assert ENSEMBLES | set(W) <= set(configs)
    for name, cfg in configs.items():
        assert cfg.name == name
        assert (repos["container"] / name / "1").is_dir(), name


def test_container_state_is_under_the_volume_and_local_paths_are_unchanged(
    repos: dict[str, Path],
) -> None:
    container, local = _configs(repos["container"]), _configs(repos["local"])
    seen = set()
    for name, cfg in container.items():
        for key in PATH_PARAMETERS:
            if key not in cfg.parameters:
                continue
            seen.add(name)
            path = Path(cfg.parameters[key].string_value)
            assert path.is_absolute() and path.is_relative_to(CONTAINER_STATE_DIR), (name, path)
            # the local target keeps its paths relative to the model folder
            assert not Path(local[name].parameters[key].string_value).is_absolute(), name
    assert seen == {"router", "decide", "selector", "feedback"}
    # the two feedback writers and the selector's reader share one database
    dbs = {container[m].parameters["outcomes_db"].string_value for m in ("selector", "feedback")}
    assert dbs == {str(CONTAINER_STATE_DIR / "feedback" / "outcomes.db")}
    # everything but those paths is the same as the local target's
    for name, cfg in container.items():
        other = local[name]
        for key in PATH_PARAMETERS:
            for c in (cfg, other):
                if key in c.parameters:
                    del c.parameters[key]
        assert cfg == other, name


def _named_models(repo: Path, cfg: mc.ModelConfig) -> set[str]:
    names = {step.model_name for step in cfg.ensemble_scheduling.step}
    folder = repo / cfg.name
    for file in ("experiment.json", "members.json", "selector.json"):
        if (folder / file).is_file():
            text = (folder / file).read_text()
            names |= set(re.findall(r'"model":\s*"([a-z0-9_]+)"', text))
    return names


def test_container_ensembles_name_only_models_of_the_repository(repos: dict[str, Path]) -> None:
    repo = repos["container"]
    configs = _configs(repo)
    called: set[str] = set()
    for cfg in configs.values():
        called |= _named_models(repo, cfg)
    assert {"router", "signal", "lightgbm", "xgboost", "mlp"} <= called
    for model in called:
        assert model in configs, model
    for engine in W:  # the engines they call are built there, with a manifest
        assert json.loads((repo / engine / "1" / "manifest.json").read_text())["model"] == engine


def _stages(text: str) -> list[str]:
    return re.findall(r"^FROM\s+(.+?)\s*$", text, flags=re.MULTILINE)


def _final_stage(text: str) -> str:
    return text[[m.start() for m in re.finditer(r"^FROM\s", text, flags=re.MULTILINE)][-1] :]


def test_dockerfile_builds_the_stack_in_the_pinned_image_and_serves_it_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    triton = compose["services"]["triton"]
    # runtime FROM the pinned NGC tag; engines built on top of it; served FROM runtime
    assert _stages(code) == ["${BASE_IMAGE} AS runtime", "runtime AS engines", "runtime"]
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(BASE_IMAGE)}$", code, re.MULTILINE)
    # compose builds it under setsuna's own name, never the base's
    assert triton["image"] == IMAGE != BASE_IMAGE
    assert triton["build"] == {"context": ".", "dockerfile": "deploy/container/Dockerfile"}
    assert f"setsuna-state:{CONTAINER_STATE_DIR}" in triton["volumes"]
    assert not [v for v in triton["volumes"] if v.startswith("./")]  # the stack is in the image
    assert "setsuna-state" in compose["volumes"]
    assert f"--model-repository={CONTAINER_REPOSITORY}" in triton["command"]
    assert Path(CONTAINER_REPOSITORY).parent == CONTAINER_STATE_DIR
    # the engines stage runs the tested module; the key only ever as a secret or on tmpfs
    assert "python3 -m build_engines.image --out /build" in code
    assert f"--signing-key {image.SECRET_KEY}" in code
    assert "--mount=type=secret,id=setsuna_signing_key,required=false,mode=0400" in code
    assert "--mount=type=tmpfs,target=/run/setsuna-key" in code
    assert "--ephemeral-key-dir /run/setsuna-key" in code
    assert not re.search(r"(?i)^(ENV|ARG)\s+\S*(TOKEN|SECRET|SIGNING|PASSWORD)", code, re.MULTILINE)
    final = _final_stage(code)
    assert f"/build/models {CONTAINER_REPOSITORY}" in final
    assert "/build/backends/setsuna_forest /opt/tritonserver/backends/setsuna_forest" in final
    assert "ENV SETSUNA_TRUSTED_KEYS=/etc/setsuna/trusted_keys" in final
    assert "--chmod=0644" in final and "/build/trusted_keys /etc/setsuna/trusted_keys" in final
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    # the numpy pin the 2.51 stub needs, and no second server from nvidia-pytriton
    assert '"numpy>=1.24,<2"' in code
    assert "pytriton" not in code  # the image is the server
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if not line.startswith("#"))] == "*"


def test_container_target_refuses_tritons_native_engines(
    repos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``build_engines --target container`` publishes ``fil`` trees (``input__0``/
    ``output__0``), which the ensembles cannot call: refused, nothing written."""
    import shutil

    repo = tmp_path / "container"
    shutil.copytree(repos["container"], repo)
    for model in ENSEMBLES:
        shutil.rmtree(repo / model)
    m = repo / "xgboost" / "1" / "manifest.json"
    doc = json.loads(m.read_text())
    doc["engine"] = "fil"
    m.write_text(json.dumps(doc))
    assert main(["--target", "container", "--model-repository", str(repo)]) == 2
    assert "'xgboost': 'fil'" in capsys.readouterr().err
    assert not (repo / "router").exists()
