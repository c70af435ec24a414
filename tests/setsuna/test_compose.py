"""docker-compose.yml and `make serve` run Triton from one source of flags."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from setsuna.compose import (
    BASE_IMAGE,
    CONTAINER_REPOSITORY,
    GPU_REPOSITORY,
    IMAGE,
    container_command,
    gpu_command,
)
from setsuna.server import ServerSettings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_command_is_generated_from_server_settings() -> None:
    triton = _compose()["services"]["triton"]
    assert triton["command"] == container_command(), (
        "docker-compose.yml drifted from ServerSettings: regenerate its command with "
        "`python -m setsuna.compose`"
    )


def test_container_and_local_share_every_flag_but_the_container_specific_ones(
    tmp_path: Path,
) -> None:
    local = ServerSettings(tmp_path, load_models=()).flags(token="t", max_input_size_flag=False)
    container = [f for f in container_command() if f.startswith("--")]
    # HTTP: off locally, on in the container (its healthcheck and probes use it).
    assert "--allow-http=false" in local and "--allow-http=false" not in container
    differ = {
        "--allow-http",
        "--http-port",
        "--http-address",
        "--grpc-address",
        "--metrics-address",
        "--load-model",
        "--model-repository",
        "--http-restricted-api",
        "--grpc-restricted-protocol",
    }
    assert {f for f in local if f.split("=")[0] not in differ} == {
        f for f in container if f.split("=")[0] not in differ
    }


def test_image_is_setsunas_ports_are_loopback_and_the_stack_is_in_the_image() -> None:
    services = _compose()["services"]
    assert services["triton"]["image"] == IMAGE
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    assert f"--model-repository={CONTAINER_REPOSITORY}" in services["triton"]["command"]
    assert "healthcheck" in services["triton"] and "healthcheck" in services["prometheus"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["triton:8002"]


def test_the_gpu_service_serves_the_gpu_repository_with_the_same_flags() -> None:
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    service = gpu["triton-gpu"]
    assert service["command"] == gpu_command(), (
        "docker-compose.gpu.yml drifted: regenerate with `python -m setsuna.compose --gpu`"
    )
    assert [f for f in gpu_command() if not f.startswith("--model-repository")] == [
        f for f in container_command() if not f.startswith("--model-repository")
    ]
    assert service["image"] == BASE_IMAGE  # Triton-native engines only: no setsuna code
    assert f"./model_repository/container-gpu:{GPU_REPOSITORY}:ro" in service["volumes"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])
    # Prometheus scrapes both servers as one job, so every alert covers both.
    (mount,) = gpu["prometheus"]["volumes"]
    assert mount == "./deploy/prometheus-gpu.yml:/etc/prometheus/prometheus.yml:ro"
    both = yaml.safe_load((ROOT / "deploy" / "prometheus-gpu.yml").read_text())
    one = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert both["scrape_configs"][0]["static_configs"][0]["targets"] == [
        "triton:8002",
        "triton-gpu:8002",
    ]
    both["scrape_configs"][0]["static_configs"] = one["scrape_configs"][0]["static_configs"]
    assert both == one


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_validates_and_requires_the_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SETSUNA_ADMIN_TOKEN"}
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]
    missing = subprocess.run(
        ["docker-compose", *files, "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "SETSUNA_ADMIN_TOKEN_must_be_set" in missing.stderr
    env["SETSUNA_ADMIN_TOKEN"] = "a-token-of-sixteen-chars"
    ok = subprocess.run(
        ["docker-compose", *files, "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "a-token-of-sixteen-chars" in ok.stdout and "capabilities" in ok.stdout
