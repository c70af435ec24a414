"""Probes of the routers' bounds: keys, memory, loops and names, BLS timeouts, one version.

One server: engines ``alpha`` and ``beta`` (logistic, numpy oracle),
``stuck`` (a leaf Python model that blocks in every execute until a byte is
written to its FIFO: "the downstream model hangs" is an event, not a
sleep), ``router`` (1 instance, a 1 MiB key memo) with ``signal`` and the
``decision`` ensemble, ``waiting`` (300 ms BLS timeout, 2 overdue calls at
most) over alpha and stuck, and ``decide`` (2 instances, arms in process).
Written with :mod:`ensembles.repository`, as the build writes them.
"""

from __future__ import annotations

import functools
import json
import os
import select
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from build_engines.spec import ServingSpec
from ensembles import repository as rep
from ensembles import signal
from ensembles.limits import Limits
from reliability import models, procs
from reliability.harness import Lab, Outcome, probe, shared
from reliability.report import Probe, gist
from reliability.stuck import Gate, stuck_model
from setsuna.contract import EXPERIMENT_FILE, ExperimentDoc, ExperimentVersion, Target
from setsuna.server import LocalTriton

N: Final = 4
RNG: Final = np.random.default_rng(5)
W: Final = {name: RNG.normal(size=N).astype(np.float32) for name in ("alpha", "beta")}
CACHE_BYTES: Final = 1 << 20
MAX_KEY: Final = 256
PATIENT_US: Final = 60_000_000  # a request timeout no loaded machine reaches
#: The router stub may grow by this much over the key flood (uncapped, or keeping
#: refused requests alive, it grew by ~256 KiB per oversized key: 50 MiB here).
MAX_GROWTH_KIB: Final = 24 * 1024
AB: Final = {"control": "alpha", "treatment": "beta"}
HALF: Final = {"control": 0.5, "treatment": 0.5}


@dataclass
class Served:
    server: LocalTriton
    repo: Path
    gate: Gate

    def close(self) -> None:
        self.gate.open(64)  # nothing stays blocked while the server stops
        self.server.stop()
        self.gate.close()


def _experiment(*weights: dict[str, float], **arms: str) -> dict[str, Any]:
    """The document as the contract writes it (not validated: probes write bad ones too)."""
    return ExperimentDoc(
        "reliability",
        "reliability-2026",
        {arm: Target(model, 1) for arm, model in arms.items()},
        tuple(ExperimentVersion(i + 1, w) for i, w in enumerate(weights)),
    ).to_json()


def _start(lab: Lab) -> Served:
    root = lab.path("ensembles")
    repo = models.logistic_models(root, W, ServingSpec(cpu_instances=1))
    gate = stuck_model(repo, root, N)
    files = lab.path("ensembles", "files")
    patient = Limits(bls_timeout_ms=60_000, max_key_cache_bytes=CACHE_BYTES, watch_interval_ms=50)
    one = rep.Serving(instances=1)
    (files / "ab.json").write_text(json.dumps(_experiment(HALF, **AB)))
    rep.write_router(repo, files / "ab.json", N, serving=one, limits=patient)
    rep.write_signal(repo, {1: signal.Thresholds()}, serving=one)
    rep.write_decision(repo, N)
    waiting = _experiment({"control": 1.0}, control="alpha", stuck="stuck")
    (files / "waiting.json").write_text(json.dumps(waiting))
    hasty = Limits(bls_timeout_ms=300, max_overdue_calls=2)
    rep.write_router(repo, files / "waiting.json", N, name="waiting", serving=one, limits=hasty)
    rep.write_router(
        repo,
        files / "ab.json",
        N,
        name="decide",
        in_process=True,
        thresholds=signal.Thresholds(),
        serving=rep.Serving(instances=2),
        limits=patient,
    )
    try:
        server = procs.start(repo, root / "triton.log")
    except BaseException:
        gate.close()
        raise
    return Served(server, repo, gate)


def run(lab: Lab) -> list[Probe]:
    with shared("the ensembles server", lambda: _start(lab), Served.close) as s:
        return [
            probe(
                "11a",
                "router: oversized sticky key",
                f"a {MAX_KEY + 1}-byte key fails its request with INVALID_ARGUMENT naming the "
                f"row and max_key_bytes={MAX_KEY}; a {MAX_KEY}-byte key is served",
                lambda: _oversized_key(s.get()),
            ),
            probe(
                "11b",
                "router: memory over a key flood",
                f"stub RSS grows < {MAX_GROWTH_KIB // 1024} MiB over 2,000 distinct "
                f"{MAX_KEY}-byte keys + 200 refused 256 KiB keys (memo capped at "
                f"{CACHE_BYTES >> 20} MiB)",
                lambda: _key_flood(s.get()),
            ),
            probe(
                "11c",
                "router: experiment arm = router itself / 'decision' / '..'",
                "each file refused (logged, counted); the previous version keeps serving, "
                "decision answers",
                lambda: _loops(s.get()),
            ),
            probe(
                "11d",
                "router: BLS call to a model that never answers",
                "the call fails after bls_timeout_ms (300 ms) with 'did not answer'; the "
                "router still answers through its other arm",
                lambda: _blocked(s.get()),
            ),
            probe(
                "12",
                "2 instances of decide: v1, v2, then a bad file",
                "all instances report the same experiment_version (2)",
                lambda: _converge(s.get()),
            ),
        ]


def _inputs(x: np.ndarray[Any, Any], keys: list[bytes] | None) -> list[Any]:
    inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if keys is not None:
        k = grpcclient.InferInput("key", [len(keys), 1], "BYTES")
        k.set_data_from_numpy(np.array([[k] for k in keys], dtype=np.object_))
        inputs.append(k)
    return inputs


def _infer(
    s: Served,
    model: str,
    x: np.ndarray[Any, Any],
    keys: list[bytes] | None = None,
    *,
    timeout_us: int | None = PATIENT_US,
    outputs: tuple[str, ...] = (),
    **params: Any,
) -> Any:
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
    with grpcclient.InferenceServerClient(s.server.grpc_url) as c:
        return c.infer(
            model,
            _inputs(x, keys),
            outputs=wanted,
            parameters=params or None,
            timeout=timeout_us,
            client_timeout=120,
        )


def _error(call: Any) -> str:
    """The error ``call()`` raised ('' when it succeeded)."""
    try:
        call()
    except InferenceServerException as exc:
        return f"{str(exc.status()).removeprefix('StatusCode.')}: {exc}"
    return ""


def _rows(x: int) -> np.ndarray[Any, Any]:
    return RNG.normal(size=(x, N)).astype(np.float32)


# -- 11a, 11b: keys ------------------------------------------------------------------------


def _oversized_key(s: Served) -> Outcome:
    x = _rows(2)
    err = _error(lambda: _infer(s, "router", x, [b"ok", b"k" * (MAX_KEY + 1)]))
    named = err.startswith("INVALID_ARGUMENT") and f"max_key_bytes={MAX_KEY}" in err
    served = _infer(s, "router", x, [b"ok", b"k" * MAX_KEY]).as_numpy("score").shape == (2, 1)
    return Outcome(
        f"{gist(err) or 'ACCEPTED'}; {MAX_KEY}-byte key served: {served}", named and served
    )


def _stub_rss(s: Served, model: str) -> int:
    assert s.server.pid is not None
    (pid,) = procs.stub_pids(s.server.pid, model)
    return procs.rss_kib(pid)


def _key_flood(s: Served) -> Outcome:
    before = _stub_rss(s, "router")
    rows = 500
    x = _rows(rows)
    for batch in range(4):  # 2,000 distinct keys of the largest size allowed
        keys = [b"%05d-%06d-" % (batch, i) + b"k" * (MAX_KEY - 13) for i in range(rows)]
        assert all(len(k) == MAX_KEY for k in keys)
        _infer(s, "router", x, keys)
    valid = _stub_rss(s, "router")
    huge = b"k" * (256 << 10)
    refused = 0
    for i in range(200):
        key = b"%06d" % i + huge[6:]
        if "max_key_bytes" in _error(lambda key=key: _infer(s, "router", x[:1], [key])):
            refused += 1
    after = _stub_rss(s, "router")
    alive = _infer(s, "router", x[:2], [b"a", b"b"]).as_numpy("score").shape == (2, 1)
    growth = after - before
    return Outcome(
        f"router stub RSS {before / 1024:.1f} MiB -> {valid / 1024:.1f} MiB after 2,000 keys "
        f"-> {after / 1024:.1f} MiB after {refused}/200 oversized refused (+{growth / 1024:.1f} "
        f"MiB); still serving: {alive}",
        refused == 200 and growth < MAX_GROWTH_KIB and alive,
        {
            "rss_before_kib": before,
            "rss_after_valid_keys_kib": valid,
            "rss_after_oversized_kib": after,
            "oversized_refused": refused,
        },
    )


# -- 11c: loops and names ------------------------------------------------------------------


def _set(s: Served, model: str, doc: dict[str, Any] | str) -> None:
    """Replace the model's experiment file in one step (temp + rename), with a new stamp."""
    path = s.repo / model / EXPERIMENT_FILE
    tmp = path.with_name(".experiment.json.tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    st = tmp.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    tmp.replace(path)


def _failures(s: Served) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(s.server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("setsuna_router_reload_failures_total{") and 'router="router"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _log(s: Served) -> str:
    path = s.server.log_path
    return path.read_text(errors="replace") if path is not None else ""


def _logged(s: Served, why: str) -> bool:
    return why in _log(s)


def _counted(s: Served, before: float) -> bool:
    return _failures(s) > before


def _loops(s: Served) -> Outcome:
    cases = {
        "router": "router:1 is this model itself",
        "decision": "decision:1 is a Triton ensemble",
        "..": "not a Triton model name",
    }
    seen = []
    x = _rows(3)
    keys = [b"a", b"b", b"c"]
    for callee, why in cases.items():
        before = _failures(s)
        _set(s, "router", _experiment(HALF, {**HALF, "loop": 0.0}, loop=callee, **AB))
        try:
            procs.wait_until(functools.partial(_logged, s, why), 30, f"the log says {why!r}")
            procs.wait_until(functools.partial(_counted, s, before), 30, "the failure counted")
            out = _infer(s, "router", x, keys)
            version = out.as_numpy("experiment_version").reshape(-1).tolist()
            with grpcclient.InferenceServerClient(s.server.grpc_url) as c:
                decided = c.infer("decision", _inputs(x, keys)).as_numpy("signal").shape == (3, 1)
            if version == [1, 1, 1] and decided:
                seen.append(callee)
        finally:
            _set(s, "router", _experiment(HALF, **AB))
    return Outcome(
        f"{len(seen)}/{len(cases)} refused with the reason logged and counted, v1 kept "
        f"serving, decision answering ({', '.join(seen)})",
        len(seen) == len(cases),
    )


# -- 11d: a downstream model that never answers --------------------------------------------


def _blocked(s: Served) -> Outcome:
    x = _rows(2)
    began = time.monotonic()
    err = _error(lambda: _infer(s, "waiting", x, arm="stuck", timeout_us=None))
    took = time.monotonic() - began
    ready, _, _ = select.select([s.gate.started], [], [], 30)
    stuck_ran = bool(ready) and os.read(s.gate.started, 1) == b"s"
    timed_out = "stuck:1 did not answer within 300 ms (bls_timeout_ms)" in err
    out = _infer(s, "waiting", x, arm="control")
    other = bool(np.allclose(out.as_numpy("score"), models.oracle(W["alpha"], x), atol=1e-5))
    # Let the stuck call come back, and the next few executes through at once.
    s.gate.open(4)
    recovered = procs.wait_until(
        lambda: not _error(lambda: _infer(s, "waiting", x, arm="stuck", timeout_us=None)),
        30,
        "stuck answers again",
    )
    return Outcome(
        f"failed after {took:.2f} s: {gist(err, 120)}; other arm answers: {other}; the "
        f"stuck arm answers again {recovered:.1f} s after its release",
        timed_out and stuck_ran and other and took < 5.0,
        {"timeout_s": round(took, 2)},
    )


# -- 12: instances agree on one version ----------------------------------------------------


def _heard(s: Served) -> dict[str, set[int]]:
    """One round of 16 concurrent requests: the versions each instance answered with."""
    x = _rows(1)

    def one(i: int) -> tuple[str, int]:
        r = _infer(s, "decide", x, [b"k%d" % i], outputs=("experiment_version", "instance"))
        return r.as_numpy("instance")[0, 0].decode(), int(r.as_numpy("experiment_version")[0, 0])

    out: dict[str, set[int]] = {}
    with ThreadPoolExecutor(8) as pool:
        for instance, version in pool.map(one, range(16)):
            out.setdefault(instance, set()).add(version)
    return out


def _all_on(s: Served, version: int, timeout_s: float = 60.0) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}

    def agreed() -> bool:
        seen.clear()
        seen.update(_heard(s))
        return len(seen) == 2 and all(v == {version} for v in seen.values())

    try:
        procs.wait_until(agreed, timeout_s, f"both instances of decide answer v{version}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; instances answered {seen}") from None
    return seen


def _converge(s: Served) -> Outcome:
    _all_on(s, 1)
    _set(s, "decide", _experiment(HALF, {"control": 0.9, "treatment": 0.1}, **AB))
    first = _infer(s, "decide", _rows(1), [b"k"], outputs=("experiment_version",))
    saw_v2 = int(first.as_numpy("experiment_version")[0, 0]) == 2
    _set(s, "decide", "{not json")
    try:
        began = time.monotonic()
        seen = _all_on(s, 2)
        took = time.monotonic() - began
    finally:
        _set(s, "decide", _experiment(HALF, **AB))
    _all_on(s, 1)
    versions = {k: sorted(v) for k, v in seen.items()}
    return Outcome(
        f"after v2 and a bad file: {versions} (agreed within {took:.2f} s); one instance saw "
        f"v2 before the bad file: {saw_v2}",
        saw_v2 and len(seen) == 2 and all(v == {2} for v in seen.values()),
        {"instances": len(seen), "agree_s": round(took, 2)},
    )
