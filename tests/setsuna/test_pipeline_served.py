"""The client, pipeline, audit log and ``audit verify`` against a real local Triton on real data.

Models: a logistic regression fitted on the ``setsuna dataset`` rows of
backtesting's EURUSD hourly bars (its manifest records the feature names),
the same weights under generic names (a schema that does not match), and a
``decide`` router over the first with thresholds. The replay is the unseen
tail of EURUSD, S&P 500 and NASDAQ, as three symbols.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from build_engines import gate
from build_engines.build import build_model
from build_engines.spec import ModelSpec
from ensembles import repository as rep
from ensembles import signal
from setsuna import audit as audit_mod
from setsuna.audit import AuditLog
from setsuna.client import AsyncClient, Client, ClientSettings
from setsuna.contract import ExperimentDoc, Target
from setsuna.dataset import LABEL, build_dataset, feature_matrix
from setsuna.errors import (
    DeadlineError,
    ModelNotReadyError,
    RejectedInputError,
    SchemaMismatchError,
    ShapeError,
    UnavailableError,
)
from setsuna.features import FeatureEngine, default_spec
from setsuna.market import ReplayFeed, datasets
from setsuna.pipeline import ModelCatalog, Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy
from setsuna.replay import replay, summary_text
from setsuna.server import LocalTriton, free_ports
from tests.helpers import logistic_candidate, logistic_source

pytest.importorskip("pandas")
SPEC = default_spec()
THRESHOLDS = signal.Thresholds(buy_at=0.52, sell_at=0.48)


@dataclass
class Served:
    server: LocalTriton
    repo: Path
    feed: ReplayFeed  # unseen tails of three series
    warmup_bars: int


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Plain gradient descent on standardised features, folded back into raw weights."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-12
    z = (x - mu) / sd
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(300):  # offline fitting, not a serving path
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w -= 0.5 * z.T @ (p - y) / len(y)
        b -= 0.5 * float((p - y).mean())
    return (w / sd).astype(np.float32), float(b - (w / sd) @ mu)


def _build(root: Path, name: str, w: np.ndarray, b: float, x: np.ndarray, names: bool) -> None:
    src = logistic_source(w, b, name=name)
    if names:
        src = dataclasses.replace(src, schema=SPEC.to_schema())
    build_model(
        src,
        x,
        ModelSpec(name, gate=gate.GateSettings(latency_calls=10, batch_budget_s=0.01)),
        root,
        ("local",),
        root / "work",
        converter=lambda s, d, c: [logistic_candidate(d / "onnx", w, b)],
        echo=False,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("pipeline")
    bars = datasets.eurusd()
    cut = int(len(bars) * 0.7)
    data = build_dataset(bars.iloc[:cut], horizon_bars=5, spec=SPEC)
    x = feature_matrix(data, SPEC)
    w, b = _fit_logistic(x.astype(np.float64), data[LABEL].to_numpy(np.float64))
    _build(root, "fx_logit", w, b, x[:400], names=True)
    _build(root, "generic_logit", w, b, x[:400], names=False)
    repo = root / "local"
    exp = root / "exp.json"
    exp.write_text(ExperimentDoc.single("fx", {"a": Target("fx_logit", 1)}, {"a": 1.0}).dumps())
    rep.write_router(repo, exp, len(SPEC), name="decide", in_process=True, thresholds=THRESHOLDS)
    import pandas as pd

    warm = 60
    tails = [
        f.iloc[int(len(f) * 0.7) - warm :] for f in (bars, datasets.sp500(), datasets.nasdaq())
    ]
    feed = ReplayFeed.from_frame(pd.concat(tails, ignore_index=True))
    # HTTP is off by default; on here because the client test covers both protocols.
    with LocalTriton.on_free_ports(repo, http=True, log_path=root / "triton.log") as server:
        yield Served(server, repo, feed, warm)


def test_client_answers_with_model_version_and_types_its_errors(served: Served) -> None:
    x = np.zeros((3, len(SPEC)), np.float32)
    with Client(served.server.grpc_url) as c:
        p = c.infer("fx_logit", x)
        assert p.model == "fx_logit" and p.version == "1" and p["score"].shape == (3, 1)
        assert list(p.served_by) == ["fx_logit:1"] * 3
        d = c.infer("decide", x, key=["EURUSD", "SPX", "NDX"])
        assert list(d.served_by) == ["fx_logit:1"] * 3 and d.model == "decide"
        with pytest.raises(ShapeError):  # client side, from the cached metadata
            c.infer("fx_logit", np.zeros((1, 3), np.float32))
        with pytest.raises(ModelNotReadyError):
            c.infer("no_such_model", x)
        x_nan = x.copy()
        x_nan[0, 0] = np.nan
        with pytest.raises(RejectedInputError):  # the backend refuses NaN: never retried
            c.infer("fx_logit", x_nan)
        with pytest.raises(DeadlineError):
            c.infer("fx_logit", x, deadline_ms=0.001)
        assert c.statistics("fx_logit")["fx_logit:1"]["success"] >= 1
    with Client(served.server.http_url, "http") as h:
        assert h.infer("fx_logit", x).version == "1"


def test_warm_up_reads_metadata_ahead_and_fails_like_a_call(served: Served) -> None:
    with Client(served.server.grpc_url, models=["fx_logit", "decide"]) as c:
        info = c.model_info("fx_logit")  # from the cache filled at construction
        assert info.name == "fx_logit" and "score" in info.outputs
        c.warm_up()  # no model: the connection alone
    with pytest.raises(ModelNotReadyError):
        Client(served.server.grpc_url, models=["no_such_model"])
    (port,) = free_ports(1)
    with pytest.raises(UnavailableError):
        Client(f"127.0.0.1:{port}").warm_up()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_has_the_sync_clients_api(served: Served, protocol: str) -> None:
    url = served.server.grpc_url if protocol == "grpc" else served.server.http_url
    x = np.zeros((2, len(SPEC)), np.float32)

    async def go() -> tuple[bool, bool, int, int]:
        async with AsyncClient(url, protocol, models=["fx_logit"]) as c:  # type: ignore[arg-type]
            await c.wait_ready("fx_logit", timeout_s=30)
            p = await c.infer("fx_logit", x)
            stats = await c.statistics("fx_logit")
            return (
                await c.model_ready("fx_logit"),
                await c.model_ready("no_such_model"),
                stats["fx_logit:1"]["success"],
                len(p["score"]),
            )

    ready, missing, success, rows = asyncio.run(go())
    assert ready and not missing and success >= 1 and rows == 2
    with Client(url, protocol) as c:  # type: ignore[arg-type]
        assert c.statistics("fx_logit")["fx_logit:1"]["success"] >= 1  # HTTP too


def test_unreachable_server_is_unavailable_after_bounded_retries() -> None:
    (port,) = free_ports(1)
    settings = ClientSettings(deadline_ms=200, max_retries=2, backoff_initial_ms=1)
    with Client(f"127.0.0.1:{port}", settings=settings) as c, pytest.raises(UnavailableError):
        c.infer("fx_logit", np.zeros((1, 15), np.float32))


def test_async_client(served: Served) -> None:
    async def go() -> tuple[str, int]:
        async with AsyncClient(served.server.grpc_url) as c:
            p = await c.infer("fx_logit", np.zeros((2, len(SPEC)), np.float32))
            return p.version, len(p["score"])

    assert asyncio.run(go()) == ("1", 2)


def test_pipeline_refuses_a_model_whose_schema_differs(served: Served) -> None:
    engine = FeatureEngine(SPEC, served.feed.symbols)
    with Client(served.server.grpc_url) as c, pytest.raises(SchemaMismatchError):
        Pipeline(
            engine,
            c,
            ThresholdPolicy(len(engine.symbols)),
            PipelineSettings("generic_logit"),
            catalog=ModelCatalog(served.repo),
        )


def test_replay_audits_every_decision_and_verify_reproduces_them(
    served: Served, tmp_path: Path
) -> None:
    db = tmp_path / "audit.db"
    with Client(served.server.grpc_url) as c:
        result = replay(
            c,
            "decide",
            served.feed,
            spec=SPEC,
            repository=served.repo,
            audit_path=db,
            policy="served",
            warmup_bars=served.warmup_bars,
        )
        s = result.summary
        assert s.stopped is None and s.decisions > 3000
        assert s.requests < s.decisions  # bars sharing a timestamp went as one request
        assert sum(s.signals.values()) == s.decisions
        assert s.signals["BUY"] > 0 and s.signals["SELL"] > 0
        with sqlite3.connect(db) as con:
            n, models, ids = con.execute(
                "SELECT count(*), group_concat(DISTINCT model || ':' || version), "
                "count(DISTINCT request_id) FROM decisions"
            ).fetchone()
            sha = con.execute("SELECT DISTINCT artifact_sha256 FROM decisions").fetchall()
            signals = dict(con.execute("SELECT signal, count(*) FROM decisions GROUP BY signal"))
        assert n == s.decisions and models == "fx_logit:1" and ids == s.requests
        assert len(sha) == 1 and len(sha[0][0]) == 64
        assert signals.get(1, 0) == s.signals["BUY"] and signals.get(-1, 0) == s.signals["SELL"]
        report = audit_mod.verify(db, c)
    assert report.ok and report.reproduced == n, report.mismatches[:3]
    # The served stances, backtested per symbol (setsuna.backtest; costs: the defaults).
    assert [b.symbol for b in result.backtests] == list(served.feed.symbols)
    assert sum(b.trades for b in result.backtests) > 0
    assert all(b.final_equity > 0 and len(b.equity) == b.bars for b in result.backtests)
    assert "buy&hold" in summary_text(result)


def test_verify_reports_a_prediction_that_does_not_reproduce(
    served: Served, tmp_path: Path
) -> None:
    db = tmp_path / "audit.db"
    engine = FeatureEngine(SPEC, served.feed.symbols)
    with Client(served.server.grpc_url) as c:
        log = AuditLog(db, feature_names=SPEC.names)
        pipe = Pipeline(engine, c, ThresholdPolicy(3), PipelineSettings("fx_logit"), audit=log)
        pipe.run(np.array(served.feed.records[:400]))
        log.close()
        with sqlite3.connect(db) as con:
            con.execute("UPDATE decisions SET score = score + 0.01 WHERE id = 7")
        report = audit_mod.verify(db, c)
    assert [m.record_id for m in report.mismatches] == [7]
    assert report.reproduced == report.checked - 1


def test_server_killed_mid_replay_stops_cleanly_and_counts(served: Served, tmp_path: Path) -> None:
    """A second server, killed by a sink after 50 requests: a clean, counted stop."""
    server = LocalTriton.on_free_ports(
        served.repo, load_models=("fx_logit",), log_path=tmp_path / "triton.log"
    ).start()
    db = tmp_path / "audit.db"
    engine = FeatureEngine(SPEC, served.feed.symbols)
    seen = []

    def killer(d: object) -> None:
        seen.append(d)
        if len(seen) == 50:
            server.stop()

    client_settings = ClientSettings(deadline_ms=500, max_retries=1)
    try:
        with Client(server.grpc_url, settings=client_settings) as c:
            log = AuditLog(db, feature_names=SPEC.names)
            pipe = Pipeline(
                engine,
                c,
                ThresholdPolicy(3),
                PipelineSettings("fx_logit"),
                audit=log,
                sinks=(killer,),
            )
            summary = pipe.run(np.array(served.feed.records))
            log.close()
    finally:
        server.stop()
    assert summary.stopped is not None and "Unavailable" in summary.stopped
    assert summary.skipped["server_gone"] >= 1
    with sqlite3.connect(db) as con:
        (n,) = con.execute("SELECT count(*) FROM decisions").fetchone()
    assert n == summary.decisions  # every decision made is recorded, nothing else
    assert summary.requests == 50
