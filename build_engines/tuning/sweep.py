"""Serve every variant of a model on the real ``tritonserver`` and measure it.

* **sweep** per variant, on the primary protocol (gRPC), batch 1, with many
  distinct held-out rows as input (:mod:`build_engines.tuning.inputs`):
  concurrency 1, 2, 4, 8, 16, 32. Levels between the first and the last stop
  once p99 exceeds the budget (higher concurrency only queues more); the first
  and last always run;
* **detail** for the model's ``default`` variant (what the builder writes
  untuned) and the chosen one: the other protocol (HTTP, binary tensors) at
  the first and last level, and 1,024-row batches at concurrency 1 on both;
  plus, for the cache variant, a run where every request is a cache hit.

**Cache honesty**: perf_analyzer cycles through the rows, so with a cache
that holds them all, every request after the first pass is a hit. Every
server here gets a tiny cache (:data:`CACHE_BYTES`), far smaller than the
rows, so the cache variant's figures are misses (lookup + insert + evict),
which is what distinct market features cost; the hit run shows the other end.
Each run's server hit share is recorded and flagged in the report.

A failed run (hang, no convergence, a rejected request) is retried once with
windows twice as long; failures are recorded in the report, never fatal.
perf_analyzer runs on the same cores as the server: figures are for this
host under this load generator; rerun on the deployment host.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.choice import Choice, choice_json, choose
from build_engines.tuning.inputs import input_rows
from build_engines.tuning.results import VariantResult, variant_json
from build_engines.tuning.served import ServedModel
from build_engines.tuning.variants import Variant
from setsuna import native_forest, seal
from setsuna.errors import ConfigError, SetsunaError
from setsuna.model_config import CONFIG_NAME
from setsuna.schema import INPUT_NAME
from setsuna.server import LocalTriton, ServerSettings

CONCURRENCY: Final = (1, 2, 4, 8, 16, 32)
BATCH_ROWS: Final = 1024
#: Server response-cache size: holds ~100 one-row entries, far fewer than the input rows.
CACHE_BYTES: Final = 16 * 1024
OUT: Final = Path(".cache/perf/triton")
#: Rough seconds per run beyond its windows (start, JSON load, teardown) and per server.
_RUN_OVERHEAD_S: Final = 0.3
_SERVER_S: Final = 4.0
#: APIs perf_analyzer calls; a server restricting any of them fails every run.
_PA_NEEDS: Final = frozenset({"health", "metadata", "inference", "model-config", "statistics"})


@dataclass(frozen=True)
class Settings:
    """How long and how hard each measurement runs."""

    protocol: pa.Protocol = "grpc"
    concurrency: tuple[int, ...] = CONCURRENCY
    window_ms: int = 500
    stability_pct: float = 50.0
    max_trials: int = 10
    batch_rows: int = BATCH_ROWS
    max_minutes: float = 40.0
    allow_cache: bool = False
    allow_batching_off: bool = False

    @property
    def other_protocol(self) -> pa.Protocol:
        return "http" if self.protocol == "grpc" else "grpc"

    @property
    def run_timeout_s(self) -> float:
        return self.window_ms * self.max_trials / 1000 * 2 + 20

    def run_estimate_s(self) -> float:
        """A stable run takes ~3.5 windows plus start-up (measured: 1.2 s at 300 ms)."""
        return self.window_ms * 3.5 / 1000 + _RUN_OVERHEAD_S

    def estimate_minutes(self, models: int, variants: int) -> tuple[float, float]:
        """Rough bounds of a sweep's length: every level stopped early, or none."""
        run_s = self.run_estimate_s()
        per_variant_lo = _SERVER_S + 2 * run_s
        per_variant_hi = _SERVER_S + len(self.concurrency) * run_s
        detail = 2 * (4 * run_s + _SERVER_S) + run_s
        lo = models * (variants * per_variant_lo + detail) / 60
        hi = models * (variants * per_variant_hi + detail) / 60
        return lo, hi


class Sweep:
    """Runs every variant of every model; keeps going when a run or a server fails."""

    def __init__(
        self,
        binary: pa.Binary,
        settings: Settings,
        out: Path,
        *,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.binary = binary
        self.settings = settings
        self.out = out
        self.echo = echo
        self.deadline = time.monotonic() + settings.max_minutes * 60
        self.skipped = 0
        #: Variants that stalled on any model so far (see VariantResult.stalled).
        self.stalled: set[str] = set()

    def _budget_left(self) -> bool:
        return time.monotonic() < self.deadline

    def measure(
        self,
        variant: str,
        url: str,
        model: str,
        protocol: pa.Protocol,
        c: int,
        data: Path | None,
        batch: int = 1,
    ) -> list[pa.RunResult]:
        """One run; a failed one is retried once with windows twice as long (both kept)."""
        s = self.settings
        spec = pa.RunSpec(
            model=model,
            url=url,
            protocol=protocol,
            concurrency=c,
            batch_size=batch,
            input_data=data,
            window_ms=s.window_ms,
            stability_pct=s.stability_pct,
            max_trials=s.max_trials,
            timeout_s=s.run_timeout_s,
        )
        csv_dir = self.out / "csv"
        tag = f"{model}.{variant}.{protocol}-c{c}-b{batch}-{'rows' if data else 'random'}"
        results: list[pa.RunResult] = []
        for attempt in range(2):
            if not self._budget_left():
                self.skipped += 1
                msg = "skipped: --max-minutes spent"
                results.append(pa.RunResult(spec, "failed", None, 0.0, message=msg))
                break
            csv_path = csv_dir / f"{tag}{'.retry' if attempt else ''}.csv"
            r = pa.run(self.binary, spec, csv_path=csv_path)
            results.append(r)
            self.echo("      " + pa.summarize([r]))
            if r.ok:
                break
            # Measured pitfalls: an occasional hang (HTTP, c=32), slow convergence, and
            # now and then a burst of queue-timeout rejections; one more try, longer.
            spec = dataclasses.replace(spec, window_ms=spec.window_ms * 2)
            spec = dataclasses.replace(spec, timeout_s=spec.timeout_s * 2)
        return results

    def serve_variant(
        self,
        model: ServedModel,
        repo: Path,
        vr: VariantResult,
        plan: Callable[[LocalTriton, VariantResult], None],
    ) -> None:
        """Write the variant's config, start a server on it, run ``plan``, stop."""
        (repo / model.name / CONFIG_NAME).write_text(model.config_text(vr.variant))
        # The seal covers config.pbtxt: sealed again, as a publisher would, or the
        # stub guard refuses every variant but the one built (seen: all but default).
        seal.seal_model(repo / model.name)
        settings = ServerSettings.on_free_ports(
            repo,
            http=True,  # this benchmark measures the HTTP frontend too (off by default)
            load_models=(model.name,),
            cache_size_bytes=CACHE_BYTES,
        )
        blocked = sorted(_PA_NEEDS & set(settings.restricted_apis))
        if blocked:
            raise ConfigError(f"the server restricts {blocked}, which perf_analyzer needs")
        log = self.out / "logs" / f"{model.name}.{vr.variant.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        server = LocalTriton(settings, log_path=log)
        try:
            server.start()
        except SetsunaError as exc:
            vr.server_error = f"server did not start: {str(exc)[:300]} (log {log})"
            self.echo(f"    {vr.server_error}")
            return
        vr.startup_s = server.startup_s
        try:
            plan(server, vr)
        finally:
            server.stop()

    def sweep_plan(
        self, data: Path, budget_us: float, detail: bool
    ) -> Callable[[LocalTriton, VariantResult], None]:
        s = self.settings

        def plan(server: LocalTriton, vr: VariantResult) -> None:
            model = server.settings.models[0]
            url = server.grpc_url if s.protocol == "grpc" else server.http_url
            levels = s.concurrency
            over = False
            for i, c in enumerate(levels):
                last = i == len(levels) - 1
                if over and i > 0 and not last:
                    continue
                attempts = self.measure(vr.variant.name, url, model, s.protocol, c, data)
                vr.runs += attempts
                if vr.stalled:  # disqualified: measuring it further buys nothing
                    self.echo(
                        f"    {vr.variant.name}: {vr.stall_count} stalled request(s); not eligible"
                    )
                    return
                r = attempts[-1]
                if r.row is not None and r.row.p99_us > budget_us:
                    over = True
            if detail:
                self.detail_runs(server, vr, data)
            if vr.variant.serving.response_cache:
                vr.runs += self.measure(vr.variant.name, url, model, s.protocol, levels[0], None)

        return plan

    def detail_runs(self, server: LocalTriton, vr: VariantResult, data: Path) -> None:
        s = self.settings
        model = server.settings.models[0]
        urls = {"grpc": server.grpc_url, "http": server.http_url}
        other = s.other_protocol
        for c in sorted({s.concurrency[0], s.concurrency[-1]}):
            vr.runs += self.measure(vr.variant.name, urls[other], model, other, c, data)
        for proto in (s.protocol, other):
            vr.runs += self.measure(
                vr.variant.name, urls[proto], model, proto, 1, data, batch=s.batch_rows
            )

    def run_model(
        self, model: ServedModel, variants: Sequence[Variant], budget_ms: float
    ) -> dict[str, Any]:
        s = self.settings
        budget_us = budget_ms * 1000
        rows, origin = input_rows(model.schema)
        if len(rows) < s.batch_rows:
            raise ConfigError(f"{model.name}: {len(rows)} input rows < batch of {s.batch_rows}")
        data = pa.write_input_json(
            rows, self.out / "inputs" / f"{model.name}.json", input_name=INPUT_NAME
        )
        repo = self.out / "repository"
        model.stage(repo)
        drift = model.config_drift(variants[0])
        results: list[VariantResult] = []
        for v in variants:
            self.echo(f"  {model.name} / {v.name}: {v.describe()}")
            vr = VariantResult(v)
            plan = self.sweep_plan(data, budget_us, detail=v.name == "default")
            self.serve_variant(model, repo, vr, plan)
            results.append(vr)
        self.stalled |= {vr.variant.name for vr in results if vr.stalled}

        threads, _ = native_forest.choose(model.manifest.engine, model.manifest.engine_params)

        def pick() -> Choice:
            return choose(
                results,
                s.protocol,
                budget_us,
                allow_cache=s.allow_cache,
                allow_batching_off=s.allow_batching_off,
                stalled_elsewhere=self.stalled,
                instances_are_threads=threads,
            )

        choice = pick()
        if choice.variant is not None and choice.variant.variant.name != "default":
            name = choice.variant.variant.name
            self.echo(f"  {model.name} / {name} (chosen): detail runs")
            chosen = choice.variant

            def detail(server: LocalTriton, vr: VariantResult) -> None:
                self.detail_runs(server, vr, data)

            self.serve_variant(model, repo, chosen, detail)
            if chosen.stalled:  # its HTTP or 1,024-row runs stalled: choose again
                self.echo(f"  {model.name} / {name}: stalled in its detail runs; choosing again")
                self.stalled.add(name)
                choice = pick()
        shutil.rmtree(repo / model.name, ignore_errors=True)
        return {
            "model": model.name,
            "engine": model.manifest.engine,
            "candidate": model.manifest.candidate,
            "row_shape": list(model.schema.row_shape),
            "input": {"rows": len(rows), "origin": origin, "file": data.name},
            "budget_p99_ms": budget_ms,
            "config_drift": drift,
            "variants": [variant_json(vr, s.protocol, budget_us) for vr in results],
            "choice": choice_json(choice, s.protocol),
            "_results": results,
            "_choice": choice,
            "_instances_are_threads": threads,
        }
