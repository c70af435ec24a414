"""deploy/k8s: rendered by the real `kubectl kustomize`, schema-checked offline, args from settings.

No cluster is involved: every overlay is rendered with kubectl's kustomize
and each object validated (strict: unknown fields fail) against the
Kubernetes schemas of ``KUBERNETES_VERSION`` by kubernetes-validate. KServe's
CRDs are not in those schemas: their documents are checked here by hand and
the runtime's container against the core Pod schema.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from setsuna import k8s
from setsuna.compose import (
    CONTAINER_REPOSITORY,
    IMAGE,
    STATE_DIR,
    TOKEN_REFERENCE,
    container_command,
    container_settings,
)
from setsuna.server import ADMIN_TOKEN_ENV

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}

Doc = dict[str, Any]


@cache
def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not installed: the deploy/k8s checks need it. `.ci/run` installs it "
            "(Debian's kubernetes-client); locally: apt-get install kubernetes-client"
        )
    return path


@cache
def _render(target: str) -> tuple[Doc, ...]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def _one(docs: tuple[Doc, ...], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _triton(docs: tuple[Doc, ...]) -> Doc:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["triton"]
    container: Doc = containers[0]
    return container


def _validate(doc: Doc) -> None:
    kubernetes_validate.validate(doc, k8s.KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("target", [*TARGETS, "kserve"])
def test_kustomize_renders(target: str) -> None:
    kinds = {d["kind"] for d in _render(target)}
    if target == "kserve":
        assert kinds == KSERVE_KINDS
    else:
        assert kinds == {
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "HorizontalPodAutoscaler",
        }


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_kubernetes_schema(target: str) -> None:
    for doc in _render(target):
        assert doc["kind"] not in KSERVE_KINDS
        _validate(doc)


def test_the_validator_is_not_vacuous() -> None:
    deployment = copy.deepcopy(_one(_render("base"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    deployment = copy.deepcopy(_one(_render("base"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


# --------------------------------------------------------------------------- one source of flags


def test_manifests_hold_the_generated_args() -> None:
    assert k8s.sync(ROOT, write=False) == [], (
        "deploy/k8s drifted from ServerSettings: run `python -m setsuna.k8s --write`"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_deployment_args_are_compose_command_with_kubernetes_references(target: str) -> None:
    triton = _triton(_render(target))
    assert triton["image"] == IMAGE == "setsuna/tritonserver:24.10-py3"
    assert triton["command"] == k8s.COMMAND
    assert triton["args"] == k8s.deployment_args()
    # The same flags as docker-compose.yml's command (itself checked against
    # ServerSettings by test_compose.py), only the repository and token
    # references differ.
    compose = [
        a.replace(
            f"--model-repository={CONTAINER_REPOSITORY}",
            f"--model-repository={k8s.REPOSITORY_REFERENCE}",
        ).replace(TOKEN_REFERENCE, k8s.TOKEN_REFERENCE)
        for a in container_command()[1:]
    ]
    assert triton["args"] == compose


@pytest.mark.parametrize("target", TARGETS)
def test_token_comes_from_a_secret_and_repository_from_the_configmap(target: str) -> None:
    docs = _render(target)
    triton = _triton(docs)
    env = {e["name"]: e for e in triton["env"]}
    token = env[ADMIN_TOKEN_ENV]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"]
    assert not token["valueFrom"]["secretKeyRef"].get("optional", False)
    assert not [d for d in docs if d["kind"] == "Secret"]
    restricted = [a for a in triton["args"] if "restricted" in a]
    assert len(restricted) == 2
    assert all(a.endswith(f"admin-key=$({ADMIN_TOKEN_ENV})") for a in restricted)
    # Kubernetes expands $(VAR) only for variables defined before use in env.
    ref = env[k8s.MODEL_REPOSITORY_ENV]["valueFrom"]["configMapKeyRef"]
    config = _one(docs, "ConfigMap")
    assert ref["name"] == config["metadata"]["name"]
    uri = config["data"][k8s.MODEL_REPOSITORY_ENV]
    if target == "overlays/gpu":  # the GPU variant, from object storage
        assert uri.startswith(("s3://", "gs://")) and uri.endswith("container-gpu"), uri
    else:  # the stack baked into the image
        assert uri == CONTAINER_REPOSITORY, uri
    # The ensembles' state folders are writable volumes, the root file system is not.
    mounts = {m["mountPath"] for m in triton["volumeMounts"]}
    assert {f"{STATE_DIR}/shadow", f"{STATE_DIR}/feedback"} <= mounts
    assert triton["securityContext"]["readOnlyRootFilesystem"] is True


# --------------------------------------------------------------------------- what the pods get


@pytest.mark.parametrize("target", TARGETS)
def test_probes_resources_and_security(target: str) -> None:
    docs = _render(target)
    triton = _triton(docs)
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    s = container_settings()
    assert ports == {"http": s.http_port, "grpc": s.grpc_port, "metrics": s.metrics_port}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    res = triton["resources"]
    for key in ("cpu", "memory"):
        assert res["requests"][key] == res["limits"][key], "Guaranteed QoS: requests == limits"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    if target == "overlays/gpu":
        assert res["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in res["limits"] and "nodeSelector" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert triton["securityContext"]["allowPrivilegeEscalation"] is False
    assert "replicas" not in _one(docs, "Deployment")["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_pdb_service_and_networkpolicy(target: str) -> None:
    docs = _render(target)
    deployment = _one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert _one(docs, "Service")["spec"]["selector"] == selector
    pdb = _one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == selector and pdb["maxUnavailable"] == 1

    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector
    assert policy["policyTypes"] == ["Ingress"]
    s = container_settings()
    by_ports = {frozenset(p["port"] for p in r["ports"]): r["from"] for r in policy["ingress"]}
    assert set(by_ports) == {frozenset({s.grpc_port, s.http_port}), frozenset({s.metrics_port})}
    metrics_from = by_ports[frozenset({s.metrics_port})]
    assert metrics_from == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    # The client rule must not have picked up the app's own labels (kustomize would
    # add them to a podSelector with includeSelectors).
    clients = by_ports[frozenset({s.grpc_port, s.http_port})]
    for peer in clients:
        for sel in peer.values():
            assert sel["matchLabels"] == {"setsuna.io/triton-client": "true"}


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_scales_the_deployment_on_triton_queue_time(target: str) -> None:
    docs = _render(target)
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    [rule] = [r for r in rules if r["name"]["as"] == name]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container_settings().metrics_port)


# --------------------------------------------------------------------------- KServe


def test_kserve_runtime_and_inference_service() -> None:
    docs = _render("kserve")
    runtime = _one(docs, "ServingRuntime")
    isvc = _one(docs, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == IMAGE
    assert container["command"] == k8s.COMMAND
    assert container["args"] == k8s.kserve_args()
    assert f"--model-repository={k8s.KSERVE_REPOSITORY}" in container["args"]
    assert f"--http-port={k8s.KSERVE_HTTP_PORT}" in container["args"]
    assert f"--grpc-port={k8s.KSERVE_GRPC_PORT}" in container["args"]
    # Apart from ports and repository, the flags are the Deployment's.
    differ = ("--http-port", "--grpc-port", "--model-repository")
    assert [a for a in container["args"] if not a.startswith(differ)] == [
        a for a in k8s.deployment_args() if not a.startswith(differ)
    ]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env[ADMIN_TOKEN_ENV]["valueFrom"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The container is a core v1 Container: check it against the Pod schema.
    _validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {"containers": [container]},
        }
    )

    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith(("s3://", "gs://"))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_generator_rewrites_a_drifted_block(tmp_path: Path) -> None:
    for rel in k8s.generated():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        text = (ROOT / rel).read_text()
        (tmp_path / rel).write_text(text.replace("--log-verbose=0", "--log-verbose=3"))
    assert k8s.main(["--check", "--root", str(tmp_path)]) == 1
    assert sorted(k8s.sync(tmp_path, write=True)) == sorted(k8s.generated())
    assert k8s.main(["--check", "--root", str(tmp_path)]) == 0
    assert (tmp_path / k8s.DEPLOYMENT).read_text() == (ROOT / k8s.DEPLOYMENT).read_text()
