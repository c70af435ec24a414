"""The operator's view: alert rules and the Grafana dashboard, against real tools.

- ``promtool`` checks the rules and the compose Prometheus config, and runs the
  unit tests of every alert (``tests/deploy/alerts_test.yml``);
- a real ``prometheus`` (Debian's 2.42) scrapes a real local Triton 2.51 every
  second with the same rules (``for:`` set to 0 s), and the failure-rate alert
  fires while requests fail; unloading a model fires the not-ready alert;
- every PromQL expression of the dashboard and of the rules names only metrics
  that this server exports (read from a live scrape) or setsuna's code defines,
  and evaluates on the live Prometheus; the ConfigMap that ``kubectl kustomize``
  renders embeds the dashboard file byte for byte.

Grafana itself is not run here (no Docker, no Grafana binary).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from setsuna.server import LocalTriton, free_ports
from tests.helpers import metrics_text, python_model, wait_until

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yml")
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "setsuna.json"

#: Triton 2.51's latency summaries, which ServerSettings passes (local, compose, k8s).
SUMMARIES = "--metrics-config=summary_latencies=true"

#: A model whose execute() raises: Triton counts nv_inference_request_failure
#: (reason BACKEND). One that returns error *responses* is counted as a success.
RAISING_PY = """\
class TritonPythonModel:
    def execute(self, requests):
        raise RuntimeError("engine exploded")
"""

CACHED_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {n} ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ {n} ] }} ]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
dynamic_batching {{ }}
response_cache {{ enable: true }}
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: apt-get install prometheus (Debian ships promtool with it)"
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def _get(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        return json.loads(resp.read().decode())


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# ----------------------------------------------------------------------------- PromQL names

#: Aggregations, functions and keywords: never metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and"}
_KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's $variables allowed).

    Strings, label matchers, ranges and grouping clauses are dropped first; an
    identifier then is a function when ``(`` follows it, a keyword, or a name.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![$\w])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (model) (rate(a_total{model=~"$model", q="x y"}[$__rate_interval])) '
        "/ on (model) group_left () max(b) > 0.5 or vector(1) unless c"
    )
    assert metric_names(expr) == {"a_total", "b", "c"}


def setsuna_metric_names() -> set[str]:
    """Every ``setsuna_*`` token in setsuna's serving code, ``{a,b}`` groups expanded."""
    names: set[str] = set()
    for folder in (ROOT / "client" / "setsuna", ROOT / "ensembles"):
        for path in folder.rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"setsuna_[a-z0-9_]*\{([a-z0-9_,]+)\}([a-z0-9_]*)", text):
                head = m.group(0).split("{")[0]
                names |= {head + part + m.group(2) for part in m.group(1).split(",")}
            names |= set(re.findall(r"setsuna_[a-z0-9_]+", text))
    return names


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _dashboard_exprs() -> list[str]:
    doc = _dashboard()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    for var in doc["templating"]["list"]:
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["query"]["query"])
        assert inner, var
        exprs.append(inner.group(1))
    return exprs


def _runnable(expr: str) -> str:
    """A dashboard expression as Grafana would send it with every variable at All."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$instance", ".*")


# ----------------------------------------------------------------------------- promtool


def test_promtool_checks_the_rules_and_the_compose_config() -> None:
    promtool = _tool("promtool")
    rules = _run(promtool, "check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in rules.stdout
    # rule_files is relative to the config: deploy/prometheus/alerts.yml here,
    # /etc/prometheus/prometheus/alerts.yml in compose (the folder is mounted there).
    config = _run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prom = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    provisioning = GRAFANA / "provisioning"
    assert mounts["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    for kind in ("datasources", "dashboards"):
        assert (
            mounts[f"./deploy/grafana/provisioning/{kind}"] == f"/etc/grafana/provisioning/{kind}"
        )
        assert list((provisioning / kind).glob("*.yml"))
    provider = yaml.safe_load((provisioning / "dashboards" / "setsuna.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def test_promtool_unit_tests_fire_every_alert_and_only_where_due() -> None:
    result = _run(_tool("promtool"), "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in _rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: never shown silent"
        # the firing cases leave neighbour series (other models, replicas) unfired
        assert all(len(c["exp_alerts"]) <= 1 for c in mine)


# ----------------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    repo = tmp_path_factory.mktemp("obs-repo")
    python_model(repo, "faulty", RAISING_PY)
    python_model(repo, "cached", config=CACHED_CONFIG)
    python_model(repo, "spare")
    with LocalTriton.on_free_ports(repo) as server:
        assert SUMMARIES in server.command  # ServerSettings passes it: the rules read them
        yield server


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, expr: str) -> Any:
        return _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = _get(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        return alerts

    def firing(self, name: str) -> list[dict[str, str]]:
        return [
            a["labels"]
            for a in self.alerts()
            if a["labels"]["alertname"] == name and a["state"] == "firing"
        ]


@pytest.fixture(scope="module")
def prometheus(
    triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Debian's prometheus scraping ``triton`` every second with the real rules, for: 0s."""
    binary = _tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (work / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    target = triton.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": [target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}", log)

        def scraped() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}: {log.read_text()}")
            try:
                up = prom.query('up{job="triton"}')["data"]["result"]
            except OSError:
                return False
            return bool(up) and up[0]["value"][1] == "1"

        wait_until("prometheus scraping triton", scraped, timeout_s=120)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _infer(server: LocalTriton, model: str) -> bool:
    """One request; True when it succeeded."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        try:
            client.infer(model, [x])
        except InferenceServerException:
            return False
        return True
    finally:
        client.close()


def test_failure_rate_alert_fires_on_a_real_prometheus(
    triton: LocalTriton, prometheus: Prometheus
) -> None:
    assert _infer(triton, "cached")

    def failing() -> list[dict[str, str]]:
        # Failures keep coming while we wait: rate() needs two scrapes that differ.
        assert not _infer(triton, "faulty")
        return prometheus.firing("TritonModelFailureRate")

    fired = wait_until("TritonModelFailureRate firing", failing, timeout_s=120)
    assert {a["model"] for a in fired} == {"faulty"}, fired
    assert fired[0]["severity"] == "critical" and fired[0]["job"] == "triton"
    assert not prometheus.firing("TritonReplicaDown")
    assert {a["model"] for a in prometheus.firing("TritonModelNotReady")} <= {"spare"}


def test_model_not_ready_alert_fires_when_a_model_is_unloaded(
    triton: LocalTriton, prometheus: Prometheus
) -> None:
    seen = 'nv_inference_request_success{job="triton", model="spare"}'
    wait_until("spare scraped", lambda: prometheus.query(seen)["data"]["result"], timeout_s=60)
    assert not prometheus.firing("TritonModelNotReady")
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        client.unload_model("spare", headers=triton.grpc_admin_headers)
    finally:
        client.close()
    fired = wait_until(
        "TritonModelNotReady firing", lambda: prometheus.firing("TritonModelNotReady"), 120
    )
    assert [a["model"] for a in fired] == ["spare"], fired


# ----------------------------------------------------------------------------- dashboard


def test_dashboard_and_rules_name_only_metrics_that_exist(
    triton: LocalTriton, prometheus: Prometheus
) -> None:
    assert _infer(triton, "cached") and _infer(triton, "cached")  # a miss, then a hit
    assert not _infer(triton, "faulty")
    page = metrics_text(triton.metrics_url)
    exported = set(re.findall(r"^# TYPE (\S+) ", page, flags=re.MULTILINE))
    assert {"nv_inference_request_summary_us", "nv_cache_num_hits_per_model"} <= exported
    # Prometheus's own per-scrape series (up, scrape_*) as the live server stores them
    stored = set(_get(f"{prometheus.url}/api/v1/label/__name__/values")["data"])
    known = exported | stored | setsuna_metric_names()
    assert "setsuna_shed_total" in known and "setsuna_router_cache_hits_total" in known

    dashboard = _dashboard_exprs()
    used = set().union(*map(metric_names, dashboard))
    assert used - known == set(), f"dashboard names metrics nobody exports: {used - known}"
    rules = set().union(*(metric_names(r["expr"]) for r in _rules()))
    assert rules - known == set(), f"rules name metrics nobody exports: {rules - known}"
    assert {"nv_inference_queue_summary_us", "nv_cpu_memory_used_bytes", "up"} <= used

    for expr in dashboard:  # each evaluates on the live Prometheus (syntax, types)
        answer = prometheus.query(_runnable(expr))
        assert answer["status"] == "success", (expr, answer)


def test_dashboard_panels_cover_the_operators_questions() -> None:
    doc = _dashboard()
    titles = {p["title"] for p in doc["panels"]}
    for wanted in ("Throughput", "p99", "Queue vs compute", "Batch size", "Cache hit rate"):
        assert any(wanted in t for t in titles), wanted
    assert {"Failures", "Memory"} <= titles
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    source = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert panel["targets"] and all(t["datasource"]["uid"] == uid for t in panel["targets"])


def test_configmap_embeds_the_dashboard_file() -> None:
    result = _run(_tool("kubectl"), "kustomize", str(GRAFANA))
    assert result.returncode == 0, result.stderr
    (doc,) = list(yaml.safe_load_all(result.stdout))
    assert doc["kind"] == "ConfigMap"
    assert doc["metadata"]["name"] == "setsuna-grafana-dashboard"
    assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert doc["data"]["setsuna.json"] == DASHBOARD.read_text()
