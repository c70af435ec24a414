"""The lifecycle against the real server: publish, shadow, compare, canary, promote, rollback.

Engines: small logistic models built by the real pipeline (ONNX Runtime behind
setsuna's wrapper, version policy ``all``). On top: the router (BLS) and
``decide`` (arms in process) over one experiment, alpha vs beta, each with a
shadow log. A second build of alpha (other weights) is what gets published.
Traffic is real gRPC from threads; every answer names the ``model:version``
that produced it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensembles import deployments, lifecycle, signal
from ensembles import repository as rep
from ensembles.limits import Limits
from setsuna import manifest, seal
from setsuna.contract import EXPERIMENT_FILE, ExperimentDoc, Target
from setsuna.errors import DeploymentConflictError, DeploymentError, ServerError
from setsuna.server import ADMIN_TOKEN_ENV, LocalTriton
from tests.helpers import build_logistic_models, logistic_onnx, wait_until

grpcclient = pytest.importorskip("tritonclient.grpc")

N = 6
RNG = np.random.default_rng(23)
W = {name: RNG.normal(size=N).astype(np.float32) for name in ("alpha", "beta")}
W2 = RNG.normal(size=N).astype(np.float32)  # alpha, retrained
X = RNG.normal(size=(600, N)).astype(np.float32)
THRESHOLDS = signal.Thresholds(buy_at=0.55, sell_at=0.45)
PATIENT = Limits(bls_timeout_ms=60_000)
KEYS = [f"SYM{i:03d}" for i in range(400)]


@dataclass
class Served:
    server: LocalTriton
    root: Path
    repo: Path
    build: Path  # a second build of alpha (weights W2)

    def life(self, **kw: Any) -> lifecycle.Lifecycle:
        return lifecycle.Lifecycle(
            self.repo,
            self.server.grpc_url,
            self.server.grpc_admin_headers,
            metrics_url=self.server.metrics_url,
            audit_db=self.root / "audit.db",
            **kw,
        )

    def ready(self, name: str) -> set[int]:
        with grpcclient.InferenceServerClient(self.server.grpc_url) as c:
            index = c.get_model_repository_index(
                headers=self.server.grpc_admin_headers, as_json=True
            )
        return {
            int(m["version"])
            for m in index["models"]
            if m["name"] == name and m.get("state") == "READY"
        }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("lifecycle")
    repo = build_logistic_models(root, W, X)
    build = build_logistic_models(root / "build", {"alpha": W2}, X)
    doc = ExperimentDoc.single(
        "ab",
        {"control": Target("alpha", 1), "treatment": Target("beta", 1)},
        {"control": 0.5, "treatment": 0.5},
        salt="ab-2026",
    )
    (root / "exp.json").write_text(doc.dumps())
    state = lifecycle.state_dir(repo) / "shadow"
    rep.write_router(repo, root / "exp.json", N, shadow_log=state / "router.jsonl", limits=PATIENT)
    rep.write_router(
        repo,
        root / "exp.json",
        N,
        name="decide",
        in_process=True,
        thresholds=THRESHOLDS,
        shadow_log=state / "decide.jsonl",
        limits=PATIENT,
    )
    members = {
        "format": 1,
        "method": "mean",
        "members": [{"model": m, "version": 1, "weight": 1.0} for m in ("alpha", "beta")],
    }
    (root / "members.json").write_text(json.dumps(members))
    rep.write_combiner(repo, root / "members.json", N, in_process=True, limits=PATIENT)
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as server:
        yield Served(server, root, repo, build)


@dataclass
class Traffic:
    """Threads sending one keyed row at a time to a model until stopped."""

    served: Served
    model: str
    threads: int
    answers: list[tuple[float, float, str]] = field(default_factory=list)  # sent, got, label
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(60)

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpcclient.InferenceServerClient(self.served.server.grpc_url) as c:
            while not self._stop.is_set():
                i = int(rng.integers(len(X)))
                f = grpcclient.InferInput("features", [1, N], "FP32")
                f.set_data_from_numpy(X[i : i + 1])
                k = grpcclient.InferInput("key", [1, 1], "BYTES")
                k.set_data_from_numpy(np.array([[KEYS[i % len(KEYS)].encode()]], dtype=object))
                sent = time.monotonic()
                try:
                    out = c.infer(
                        self.model,
                        [f, k],
                        outputs=[grpcclient.InferRequestedOutput("model")],
                        client_timeout=60,
                    )
                except Exception as exc:
                    self.failures.append(str(exc)[:300])
                    continue
                self.answers.append((sent, time.monotonic(), out.as_numpy("model")[0, 0].decode()))

    def p99_ms(self, since: float, until: float) -> float:
        lat = [(g - s) * 1e3 for s, g, _ in self.answers if since <= s < until]
        return float(np.percentile(lat, 99)) if lat else float("nan")


def _rebuild(folder: Path, change: Any) -> None:
    """Edit a built version folder the way a builder would, then re-manifest and re-seal it:
    a build that is signed and intact, whose engine is what ``change`` made it."""
    change(folder)
    m = manifest.read(folder)
    files = {k: v for k, v in manifest.hash_folder(folder).items() if k != "manifest.json"}
    manifest.write(folder, replace(m, files=files))
    seal.remove_seal(folder)
    seal.seal_version(folder)


def test_without_the_admin_token_every_step_is_refused(served: Served) -> None:
    life = lifecycle.Lifecycle(
        served.repo, served.server.grpc_url, {}, metrics_url=served.server.metrics_url,
        audit_db=served.root / "audit.db",
    )  # fmt: skip
    steps = [
        lambda: life.publish("alpha", served.build),
        lambda: life.shadow("alpha", 1),
        lambda: life.compare("alpha", 1),
        lambda: life.canary("alpha", 10),
        lambda: life.promote("alpha"),
        lambda: life.rollback(),
    ]
    for step in steps:
        with pytest.raises(ServerError, match=ADMIN_TOKEN_ENV):
            step()
    assert served.ready("alpha") == {1}
    assert not (served.repo / "alpha" / "2").exists()
    verbs = [
        ["publish", "alpha", "--from", str(served.build)], ["shadow", "alpha"],
        ["compare", "alpha"], ["canary", "alpha", "--percent", "5"], ["promote", "alpha"],
        ["rollback"], ["history"],
    ]  # fmt: skip
    for env in (
        {k: v for k, v in os.environ.items() if k != ADMIN_TOKEN_ENV},
        {**os.environ, ADMIN_TOKEN_ENV: "not-the-servers-token-0123"},
    ):
        for verb in verbs:
            cli = subprocess.run(
                [sys.executable, "-m", "setsuna.cli", "models", *verb,
                 "--url", served.server.grpc_url, "--model-repository", str(served.repo)],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert cli.returncode == 2 and ADMIN_TOKEN_ENV in cli.stderr, (verb, cli.stderr)


def test_a_bad_publish_leaves_the_serving_version_and_says_why(served: Served) -> None:
    life = served.life()
    built = served.build / "alpha" / "1"
    cases: dict[str, tuple[Path, str]] = {}

    tampered = served.root / "bad" / "tampered" / "alpha"
    shutil.copytree(served.build / "alpha", tampered)
    with (tampered / "1" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    cases["tampered"] = (tampered.parent, "does not match")

    garbage = served.root / "bad" / "garbage" / "alpha"
    shutil.copytree(served.build / "alpha", garbage)
    _rebuild(garbage / "1", lambda d: (d / "model.onnx").write_bytes(b"not an onnx graph"))
    cases["engine that does not load"] = (garbage.parent, "pre-flight.*failed.*onnx")

    nan = served.root / "bad" / "nan" / "alpha"
    shutil.copytree(served.build / "alpha", nan)
    nan_w = np.full(N, np.nan, dtype=np.float32)
    _rebuild(nan / "1", lambda d: logistic_onnx(d / "model.onnx", nan_w, 0.0))
    cases["engine that fails warm-up"] = (nan.parent, "pre-flight.*non-finite scores")

    garbled = served.root / "bad" / "garbled" / "alpha"
    shutil.copytree(served.build / "alpha", garbled)
    (garbled / "config.pbtxt").write_text('name: "alpha"\nmax_batch_size: many\n')
    seal.remove_seal(garbled / "1")
    seal.seal_version(garbled / "1")  # signed as garbled: only the schema can refuse it
    cases["config Triton's schema rejects"] = (garbled.parent, "config.pbtxt:2:")

    wide = RNG.normal(size=(300, N + 1)).astype(np.float32)
    other = build_logistic_models(served.root / "bad" / "wide", {"alpha": wide[0]}, wide)
    cases["config that differs"] = (other, "differs from the served config")

    for what, (build, why) in cases.items():
        with pytest.raises(DeploymentError, match=why):
            life.publish("alpha", build)
        assert served.ready("alpha") == {1}, what
        assert sorted(p.name for p in (served.repo / "alpha").iterdir() if p.is_dir()) == ["1"]
    history = deployments.history(served.root / "audit.db", "alpha")
    assert [s.outcome for s in history[-5:]] == ["refused"] * 5
    # Behind the pre-flight, Triton's own load is the second line: without it, the
    # engine that cannot load fails inside TRITONBACKEND_ModelInstanceInitialize
    # (before any backend thread exists: not the warm-up crash) and is taken out.
    unchecked = served.life()
    unchecked._preflight = lambda staged: {}  # type: ignore[method-assign]
    with pytest.raises(DeploymentError, match=r"did not come up.*INVALID_PROTOBUF"):
        unchecked.publish("alpha", garbage.parent)
    assert served.ready("alpha") == {1}
    assert sorted(p.name for p in (served.repo / "alpha").iterdir() if p.is_dir()) == ["1"]
    assert deployments.history(served.root / "audit.db", "alpha")[-1].outcome == "failed"
    assert built.is_dir()  # the build itself is never touched


def test_publish_canary_promote_rollback_under_load_fail_nothing(served: Served) -> None:
    life = served.life()
    with Traffic(served, "decide", 8) as decide, Traffic(served, "router", 2) as router:
        wait_until("traffic", lambda: len(decide.answers) > 200 and len(router.answers) > 50)
        t0 = time.monotonic()
        published = life.publish("alpha", served.build)
        assert published.to_version == 2 and served.ready("alpha") == {1, 2}
        shadowed = life.shadow("alpha", 2)
        wait_until("shadow traffic", lambda: len(decide.answers) > 800)
        (cmp_,) = [c for c in life.compare("alpha", 2) if c.primary == "alpha:1"][:1]
        assert cmp_.rows > 0 and 0 <= cmp_.identical_signals <= 1
        assert cmp_.max_abs_diff > 0  # other weights: the shadow does differ
        t_canary = time.monotonic()
        canary = life.canary("alpha", 10)
        wait_until("canary traffic", lambda: any(a[2] == "alpha:2" for a in decide.answers))
        t_promote = time.monotonic()
        promoted = life.promote("alpha")
        t_promoted = time.monotonic()
        assert served.ready("alpha") == {2}
        assert (lifecycle.state_dir(served.repo) / "retired" / "alpha" / "1").is_dir()
        n_before = len(decide.answers)
        wait_until("traffic on the promoted version", lambda: len(decide.answers) > n_before + 300)
        t_rollback = time.monotonic()
        rolled = life.rollback()
        t_end = time.monotonic()
        wait_until("traffic after the rollback", lambda: len(decide.answers) > n_before + 600)
    assert decide.failures == [] and router.failures == []
    watchdog = served.server.watchdog
    assert watchdog is not None and list(watchdog.events) == []  # no version taken for dead
    for traffic in (decide, router):
        after_promote = {
            label for s, _, label in traffic.answers if t_promoted <= s and s < t_rollback
        }
        assert "alpha:1" not in after_promote, "an answer from the unloaded version"
    assert served.ready("alpha") == {1, 2}  # the rollback loaded version 1 back
    # The combiner's members moved with the promote (so nothing kept 1 loaded) and back.
    assert set(promoted.experiments) == {"router", "decide", "combiner"}
    promoted_members = json.loads(promoted.experiments["combiner"]["after"])["members"]
    assert {(m["model"], m["version"]) for m in promoted_members} == {("alpha", 2), ("beta", 1)}
    now = json.loads((served.repo / "combiner" / "members.json").read_text())["members"]
    assert {(m["model"], m["version"]) for m in now} == {("alpha", 1), ("beta", 1)}
    assert rolled.undoes == promoted.id and rolled.figures["reloaded"] == ["alpha:1"]
    p99 = decide.p99_ms
    print(
        f"\ndecide c=8 p99: before {p99(0, t0):.1f} ms, publish..canary {p99(t0, t_canary):.1f}, "
        f"canary..promote {p99(t_canary, t_promote):.1f}, promote "
        f"{p99(t_promote, t_promoted):.1f}, rollback {p99(t_rollback, t_end):.1f}; rollback "
        f"switch {rolled.figures['switch_ms']} ms"
    )
    steps = deployments.history(served.root / "audit.db", "alpha")
    done = [s.action for s in steps if s.outcome == "done"]
    assert done[-6:] == ["publish", "shadow", "compare", "canary", "promote", "rollback"]
    assert all(s.who for s in steps) and canary.figures["percent"] == 10
    assert shadowed.experiments and promoted.from_version == 1 and promoted.to_version == 2
    # The arm set in force is the one before the promote: the canary at 10 %.
    _, doc = next(f for f in life._experiment_files() if f.model == "decide").read()
    assert doc.arms["control.canary"] == Target("alpha", 2)
    assert doc.latest.weights["control.canary"] == pytest.approx(0.05)


def test_two_operators_promote_at_once_one_wins(served: Served) -> None:
    """Two `setsuna models promote` processes started together; a reader parses the
    experiment files the whole time and never sees a partial one."""
    files = [served.repo / m / EXPERIMENT_FILE for m in ("router", "decide")]
    seen, torn = [0], []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for f in files:
                try:
                    ExperimentDoc.loads(f.read_bytes(), origin=str(f))
                    seen[0] += 1
                except Exception as exc:
                    torn.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    env = {**os.environ, ADMIN_TOKEN_ENV: served.server.admin_token}
    argv = [
        sys.executable, "-m", "setsuna.cli", "models", "promote", "alpha",
        "--url", served.server.grpc_url, "--metrics-url", served.server.metrics_url,
        "--model-repository", str(served.repo), "--audit-db", str(served.root / "audit.db"),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    stop.set()
    reader.join(10)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert "another lifecycle step is running" in loser or "nothing to promote" in loser, loser
    assert torn == [] and seen[0] > 0
    assert served.ready("alpha") == {2}


def test_rollback_refuses_when_someone_changed_the_file_since(served: Served) -> None:
    life = served.life()
    f = served.repo / "router" / EXPERIMENT_FILE
    doc = ExperimentDoc.loads(f.read_text())
    lifecycle._write_atomic(f, doc.then(doc.latest.weights).dumps())  # a hand edit
    with pytest.raises(DeploymentConflictError, match="changed since step"):
        life.rollback()
    lifecycle._write_atomic(f, doc.dumps())


def test_a_second_step_while_one_holds_the_lock_is_refused_at_once(served: Served) -> None:
    life = served.life()
    with life._lock("promote", "alpha"):
        other = served.life(who="someone else")
        with pytest.raises(DeploymentConflictError, match=r"promote alpha by .* since"):
            other.canary("alpha", 5)  # non-blocking: refused, never queued behind the first


def test_history_lists_every_step_with_who_and_what(
    served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from setsuna import cli

    monkeypatch.setenv(ADMIN_TOKEN_ENV, served.server.admin_token)
    db = served.root / "audit.db"
    argv = ["models", "history", "alpha", "--url", served.server.grpc_url, "--audit-db"]
    assert cli.main([*argv, str(db), "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert {s["action"] for s in steps} >= {"publish", "canary", "promote", "rollback"}
    assert all(s["model"] == "alpha" and "pid" in s["who"] for s in steps)
    assert cli.main([*argv, str(db)]) == 0
    assert "promote  alpha" in capsys.readouterr().out


def test_a_step_killed_midway_is_on_record_and_rolls_back(served: Served) -> None:
    """``kill -9`` of an operator's canary after it replaced the files and while it waits
    for the instances (its metrics endpoint never answers): the step is on record as
    started, the kernel released the lock, and a rollback restores the files."""
    assert served.life().publish("alpha", served.build).to_version == 3  # to canary
    files = {m: served.repo / m / EXPERIMENT_FILE for m in ("router", "decide")}
    before = {m: f.read_text() for m, f in files.items()}
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # connections complete in the kernel; nobody ever answers
    env = {**os.environ, ADMIN_TOKEN_ENV: served.server.admin_token}
    argv = [
        sys.executable, "-m", "setsuna.cli", "models", "canary", "alpha", "--percent", "30",
        "--url", served.server.grpc_url,
        "--metrics-url", f"http://127.0.0.1:{mute.getsockname()[1]}/metrics",
        "--model-repository", str(served.repo), "--audit-db", str(served.root / "audit.db"),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    try:
        wait_until(
            "the canary to replace the files",
            lambda: all(f.read_text() != before[m] for m, f in files.items()),
        )
        proc.kill()
        proc.wait(30)
    finally:
        mute.close()
    last = deployments.history(served.root / "audit.db")[-1]
    assert (last.action, last.outcome) == ("canary", "started")
    assert set(last.experiments) == {"router", "decide"}
    rolled = served.life().rollback()  # the lock died with its holder
    assert rolled.undoes == last.id
    assert {m: f.read_text() for m, f in files.items()} == before


def test_a_file_no_instance_is_seen_taking_is_put_back_and_recorded_failed(
    served: Served,
) -> None:
    """When the step cannot see every instance take the new file (here: a metrics
    endpoint that never answers), the old files are written back and the step is
    recorded as failed, with the files it tried."""
    files = {m: served.repo / m / EXPERIMENT_FILE for m in ("router", "decide")}
    before = {m: f.read_text() for m, f in files.items()}
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    try:
        life = lifecycle.Lifecycle(
            served.repo,
            served.server.grpc_url,
            served.server.grpc_admin_headers,
            metrics_url=f"http://127.0.0.1:{mute.getsockname()[1]}/metrics",
            audit_db=served.root / "audit.db",
        )
        with pytest.raises(DeploymentError, match="old files are back on disk"):
            life.canary("alpha", 20)
    finally:
        mute.close()
    assert {m: f.read_text() for m, f in files.items()} == before
    last = deployments.history(served.root / "audit.db")[-1]
    assert (last.action, last.outcome) == ("canary", "failed")
    assert set(last.experiments) == {"router", "decide"}
