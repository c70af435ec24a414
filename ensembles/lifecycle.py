"""Day-2 operations on a running server: publish, shadow, compare, canary, promote, roll back.

    setsuna models publish NAME --from BUILD     N+1 beside N, loaded, warmed up
    setsuna models shadow NAME [--version V]     V gets a copy of live traffic
    setsuna models compare NAME                  V against N on that traffic
    setsuna models canary NAME --percent P       P % of N's keys move to V (sticky)
    setsuna models promote NAME                  V is the only arm; N unloaded
    setsuna models rollback                      the arm set before the last step
    setsuna models history [NAME]                every step, who and when

Everything goes through Triton's own mechanisms, never a restart: explicit
model control (``load_model`` behind the admin token), the engines' version
policy ``all`` (every version folder in the model folder serves, so adding
folder N+1 and loading the model brings N+1 up beside N, and moving folder N
out and loading again unloads N once its in-flight requests are done:
Triton's unload waits for them), and the experiment files the router and
``decide`` watch (:mod:`ensembles.experiment`; arms pin ``model:version``).

How a step takes effect, and how we know it did. Each changed experiment file
is written whole (temporary file, fsync, rename): a reader sees the old file
or the new one. Each instance of each model that reads it publishes the
digest of the bytes it serves (``setsuna_watched_file_digest``,
:func:`ensembles.watch.file_digest`); the step waits until every instance
reports the new digest, and only then unloads what the old file named. A
file no instance takes within ``settle_timeout_s`` (refused: the server log
says why) is put back, and the step fails with nothing changed.

Two operators. Every step holds ``lifecycle.lock`` in :func:`state_dir` (``flock``,
not waited for): a second step while one runs is refused at once with the
first one's operator, action and start time (:class:`DeploymentConflictError`);
the kernel drops the lock of a killed operator. A step whose premise no
longer holds once it has the lock (the canary it would promote was already
promoted) is refused the same way. Publishing also takes the model's publish
lock (:func:`setsuna.publish.model_lock`), shared with ``make build-engines``.

Every step, done, refused or failed, is a row in the deployment records
(:mod:`ensembles.deployments`) with who, when, from which version to which,
the figures (load and warm-up times, the comparison) and each experiment
before and after; ``rollback`` restores the "before" of the newest step not
yet undone, after checking that nobody changed the files since.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from google.protobuf import text_format

from ensembles import deployments, members, selection, shadowlog, signal, statedb
from ensembles.watch import file_digest
from setsuna import manifest, model_config, publish, seal
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import (
    AuditError,
    ConfigError,
    DeploymentConflictError,
    DeploymentError,
    ServerError,
    SetsunaError,
)
from setsuna.model_config import CONFIG_NAME

CANARY_SUFFIX: Final = ".canary"
#: The PostgreSQL advisory lock every step takes when the records are in PostgreSQL.
RECORDS_LOCK: Final = "setsuna.lifecycle"


def state_dir(repo: Path) -> Path:
    """Run-time state of repository ``repo``: ``<parent>/.<name>.state/``.

    Lock, retired versions, the examples' shadow logs and the default
    deployment records. Beside the repository, not in it: Triton lists every
    folder of a repository in its index (a hidden one too, measured) and a
    container started with ``--load-model=*`` would try to load it; and on
    the same file system, so that retiring a version is a rename.
    """
    repo = repo.resolve()
    return repo.parent / f".{repo.name}.state"


_DIGEST_METRIC: Final = "setsuna_watched_file_digest"
_POLL_S: Final = 0.05
_INFER_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class LifecycleSettings:
    """Bounds on each wait, validated once."""

    #: Every instance must take a new experiment file within this.
    settle_timeout_s: float = 30.0
    #: A version's load (Triton runs the config's warm-up inside it).
    load_timeout_s: float = 300.0
    #: An unloaded version must be gone (its in-flight requests answered) within this.
    drain_timeout_s: float = 120.0
    #: Batches sent to a new version, pinned to it, before it is called published.
    warmup_requests: int = 8

    def __post_init__(self) -> None:
        for name in ("settle_timeout_s", "load_timeout_s", "drain_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 86_400:
                raise ConfigError(f"{name}={v!r}: give seconds in (0, 86400]")
        w = self.warmup_requests
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 10_000:
            raise ConfigError(f"warmup_requests={w!r}: give 1..10000 batches")


@dataclass(frozen=True)
class WatchedFile:
    """A model that serves from a watched JSON file (experiment, members, selector)."""

    model: str
    path: Path
    instances: int
    #: The config parameter naming it: ``experiment_file``, ``members_file``, ...
    parameter: str

    def text(self) -> str:
        try:
            return self.path.read_text()
        except OSError as exc:
            raise DeploymentError(f"cannot read {self.path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ExperimentFile(WatchedFile):
    """A model that serves from an experiment file (a router, ``decide``)."""

    shadow_log: Path | None = None
    thresholds: signal.Thresholds = field(default_factory=signal.Thresholds)

    def read(self) -> tuple[str, ExperimentDoc]:
        text = self.text()
        return text, ExperimentDoc.loads(text, origin=str(self.path))


@dataclass(frozen=True)
class Change:
    """One watched file's new text, and what it held before."""

    file: WatchedFile
    before: str
    after: str


class Lifecycle:
    """The lifecycle of the models in ``repo`` served by the Triton at ``url`` (gRPC).

    ``headers`` carry the admin token (``LocalTriton.grpc_admin_headers``, or
    :func:`admin_headers` from ``$SETSUNA_ADMIN_TOKEN``): every step reads the
    repository index first, so without it every step is refused.
    ``metrics_url`` is the server's Prometheus endpoint, where the instances
    report the file they serve. ``audit_db``: the deployment records (default
    ``<repo's parent>/.<repo name>.state/deployments.db``: :func:`state_dir`), a
    SQLite path or a ``postgresql://`` URL shared by operators on several hosts
    (:mod:`ensembles.statedb`; checked here, once).
    """

    def __init__(
        self,
        repo: Path,
        url: str,
        headers: Mapping[str, str],
        *,
        metrics_url: str,
        audit_db: Path | str | None = None,
        who: str | None = None,
        settings: LifecycleSettings | None = None,
    ) -> None:
        self.repo = repo.resolve()
        self.url, self.headers, self.metrics_url = url, dict(headers), metrics_url
        self.audit_db: Path | str = audit_db or state_dir(self.repo) / "deployments.db"
        self._records = deployments.target(self.audit_db)  # a bad URL fails here, once
        self.who = who or deployments.operator()
        self.settings = settings or LifecycleSettings()
        self._grpc: Any = None
        self._step: tuple[str, str] = ("", "")
        self._intent: int | None = None

    # ------------------------------------------------------------------ publish

    def publish(self, name: str, build: Path) -> deployments.Step:
        """Add ``build``'s newest version of ``name`` as version N+1, load and warm it up.

        ``build`` is a repository holding ``name/`` (what ``python -m
        build_engines --out B`` writes under ``B/local``) or the model folder
        itself. Its seal and manifest are verified, its config must match the
        live one (backend, inputs, outputs, batching limit: the versions of a
        model share one config), it is re-sealed for its new version number and
        renamed in whole. A version that fails to load or to warm up is taken
        out again and N keeps serving; either way the step is recorded.
        """
        self._index()  # the admin token, before anything else
        live = self._model_folder(name)
        before = self._ready(name)
        try:
            with (
                publish.model_lock(self.repo, name, timeout_s=0.1),
                self._lock("publish", name),
            ):
                return self._publish(name, build, live, before)
        except SetsunaError as exc:
            if isinstance(exc, DeploymentConflictError) or "is being published" in str(exc):
                raise DeploymentConflictError(str(exc)) from None
            raise

    def _publish(self, name: str, build: Path, live: Path, before: set[int]) -> deployments.Step:
        from_version = max(before, default=None)
        try:
            source = self._build_version(name, build)
            self._check_compatible(name, live, source.parent)
        except SetsunaError as exc:
            return self._refuse("publish", name, exc, from_version=from_version)
        version = self._next_version(name, live)
        publish.remove_leftovers(self.repo, name)
        box = self.repo / f"{publish.PREFIX}{name}.{secrets.token_hex(8)}"
        staged = box / name / str(version)
        try:
            staged.parent.mkdir(parents=True)
            shutil.copy2(live / CONFIG_NAME, staged.parent / CONFIG_NAME)
            shutil.copytree(source, staged, symlinks=True)
            seal.remove_seal(staged)
            seal.seal_version(staged)  # for this version number and the live config
            manifest.verify_sealed(staged)
            preflight = self._preflight(staged)
            publish.sync_tree(box)
            self._begin(from_version=from_version, to=version)
            staged.rename(live / str(version))
            publish.fsync_dir(live)
        except (SetsunaError, OSError) as exc:
            shutil.rmtree(box, ignore_errors=True)
            return self._refuse("publish", name, exc, from_version=from_version, to=version)
        shutil.rmtree(box, ignore_errors=True)
        began = time.monotonic()
        try:
            self._load(name)
            self._wait_versions(name, ready={version} | before, gone=set())
            load_s = time.monotonic() - began
            warm = self._warm_up(name, version, live)
        except SetsunaError as exc:
            self._take_out(name, version, live, before)
            return self._record(
                "publish",
                name,
                "failed",
                f"version {version} of {name!r} did not come up: {exc}; it was taken out "
                f"again and {self._serving_text(name, before)} serves as before",
                from_version=from_version,
                to=version,
                raise_as=DeploymentError,
            )
        return self._record(
            "publish",
            name,
            "done",
            f"{name}:{version} published from {source} beside "
            f"{self._serving_text(name, before)}: loaded in {load_s:.2f} s, warm-up "
            f"p50 {warm['warmup_p50_ms']:.2f} ms",
            from_version=from_version,
            to=version,
            figures={"load_s": round(load_s, 3), **preflight, **warm},
        )

    def _build_version(self, name: str, build: Path) -> Path:
        folder = build / name if (build / name / CONFIG_NAME).is_file() else build
        if not (folder / CONFIG_NAME).is_file() or folder.name != name:
            raise DeploymentError(
                f"{build} holds no model {name!r}: give the repository a build wrote "
                f"(python -m build_engines --out B writes B/local/{name}/) or that model folder"
            )
        versions = sorted((int(p.name) for p in folder.iterdir() if _is_version(p)), reverse=True)
        if not versions:
            raise DeploymentError(f"{folder} has no version folder to publish")
        version = folder / str(versions[0])
        m = manifest.verify_sealed(version)  # signed by a trusted builder, every file intact
        if m.model != name:
            raise DeploymentError(
                f"{version} is a build of model {m.model!r}, not {name!r}: publish it as "
                f"{m.model!r} or rebuild it under --name {name}"
            )
        return version

    def _check_compatible(self, name: str, live: Path, built: Path) -> None:
        a = model_config.load(live / CONFIG_NAME)
        b = model_config.load(built / CONFIG_NAME, name=name)
        if a.version_policy.WhichOneof("policy_choice") != "all":
            raise DeploymentError(
                f"{live / CONFIG_NAME} serves only some of its versions (version_policy "
                f"{text_format.MessageToString(a.version_policy, as_one_line=True) or 'latest 1'}"
                "): loading N+1 would unload N. Rebuild the repository (make build-engines "
                "writes version_policy all) before publishing beside a serving version"
            )
        differ = [
            what
            for what, x, y in (
                ("backend", a.backend, b.backend),
                ("platform", a.platform, b.platform),
                ("inputs", _io(a.input), _io(b.input)),
                ("outputs", _io(a.output), _io(b.output)),
                ("max_batch_size", a.max_batch_size, b.max_batch_size),
            )
            if x != y
        ]
        if differ:
            raise DeploymentError(
                f"the build of {name!r} differs from the served config in {differ}: the "
                "versions of a model share one config.pbtxt. Rebuild it with the served "
                "settings, or publish it under a new model name"
            )

    def _next_version(self, name: str, live: Path) -> int:
        """One above every version this model ever had (live, retired): never reused."""
        seen = [int(p.name) for p in live.iterdir() if _is_version(p)]
        retired = self._retired(name)
        if retired.is_dir():
            seen += [int(p.name) for p in retired.iterdir() if _is_version(p)]
        return max(seen, default=0) + 1

    def _preflight(self, staged: Path) -> dict[str, float]:
        """Load the staged engine and score warm-up rows in a child process, before Triton
        ever sees it.

        Triton 2.51 can crash (SIGSEGV) when its own config warm-up fails while
        it loads a version: the failed instance is destroyed while its backend
        thread still holds it (docs/architecture.md, "A warm-up failure can
        crash 2.51"). So an engine that fails to load, answers non-finite
        scores, raises, or kills its process (a broken compiled library) is
        refused here, in a process of its own, and never reaches the server.
        """
        import subprocess
        import sys

        code = "import sys; from ensembles.lifecycle import preflight_child as f; f(sys.argv[1])"
        began = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, str(staged), str(self.settings.warmup_requests)],
                capture_output=True,
                text=True,
                timeout=self.settings.load_timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"the engine in {staged.name} did not load and answer within "
                f"{self.settings.load_timeout_s:g} s in a pre-flight process"
            ) from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            how = (
                f"was killed by signal {-done.returncode}"
                if done.returncode < 0
                else f"failed: {tail}"
            )
            raise DeploymentError(f"the engine's pre-flight (load + warm-up rows) {how}")
        return {"preflight_s": round(time.monotonic() - began, 3)}

    def _warm_up(self, name: str, version: int, live: Path) -> dict[str, float]:
        """Batches pinned to ``name:version``: each must answer, with finite scores."""
        import tritonclient.grpc as grpcclient

        cfg = model_config.load(live / CONFIG_NAME)
        first = cfg.input[0]
        dims = [int(d) for d in first.dims]
        rng = np.random.default_rng(version)
        took = []
        for i in range(self.settings.warmup_requests):
            rows = 1 if i % 2 == 0 else 8
            x = rng.normal(size=(rows, *dims)).astype(np.float32)
            inp = grpcclient.InferInput(first.name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            began = time.perf_counter()
            try:
                out = self._client().infer(
                    name, [inp], model_version=str(version), client_timeout=_INFER_TIMEOUT_S
                )
            except Exception as exc:
                raise DeploymentError(f"warm-up request {i + 1} failed: {_message(exc)}") from None
            took.append((time.perf_counter() - began) * 1e3)
            y = out.as_numpy(cfg.output[0].name)
            if y is None or not np.isfinite(y).all():
                raise DeploymentError(f"warm-up request {i + 1} answered non-finite scores")
        return {"warmup_p50_ms": round(float(np.median(took)), 3), "warmup_requests": len(took)}

    def _take_out(self, name: str, version: int, live: Path, keep: set[int]) -> None:
        """Remove a version that never served and make Triton forget it."""
        folder = live / str(version)
        trash = self.repo / f"{publish.PREFIX}{name}.{secrets.token_hex(8)}"
        try:
            trash.mkdir()
            folder.rename(trash / str(version))
            publish.fsync_dir(live)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        try:
            self._load(name)
            self._wait_versions(name, ready=keep, gone={version})
        except SetsunaError:
            pass  # Triton keeps what served when a reload fails: N serves either way

    # ------------------------------------------------------------------ shadow, compare

    def shadow(
        self, name: str, version: int | None = None, *, clear: bool = False
    ) -> deployments.Step:
        """Copy live traffic of every experiment that routes to ``name`` to ``name:version``
        (default: its newest READY version); ``clear``: stop shadowing."""
        self._index()
        with self._lock("shadow", name):
            files = self._routing(name)
            if not files:
                return self._refuse("shadow", name, DeploymentError(self._no_route(name)))
            target = None
            if not clear:
                version = version or max(self._ready(name), default=0)
                if version not in self._ready(name):
                    return self._refuse(
                        "shadow", name, DeploymentError(self._not_ready(name, version))
                    )
                target = Target(name, version)
            changes = []
            for f in files:
                text, doc = f.read()
                new = ExperimentDoc(doc.name, doc.salt, doc.arms, doc.versions, target)
                new = new.then(doc.latest.weights)  # a new experiment version: traceable
                changes.append(Change(f, text, new.dumps()))
            took = self._apply(changes)
            what = "no shadow" if target is None else f"shadow {target.label}"
            return self._record(
                "shadow",
                name,
                "done",
                f"{what} in {', '.join(f.model for f in files)}; every instance took it in "
                f"{took * 1e3:.0f} ms",
                to=None if target is None else target.version,
                figures={"switch_ms": round(took * 1e3, 1)},
                changes=changes,
            )

    def compare(
        self, name: str, version: int | None = None, *, since_ns: int = 0, record: bool = True
    ) -> list[shadowlog.Comparison]:
        """How ``name:version`` (the shadow) compares with the versions that answered the
        same rows, from the routers' shadow logs: signals, max |Δ| of scores, latency."""
        self._index()
        files = self._routing(name, shadows_too=True)
        if version is None:
            shadows = {doc.shadow for _, doc in (f.read() for f in files) if doc.shadow}
            mine = sorted(t.version for t in shadows if t.model == name)
            if not mine:
                raise DeploymentError(
                    f"nothing shadows {name!r} now: give --version, or start one with "
                    f"`setsuna models shadow {name}`"
                )
            version = mine[-1]
        label = Target(name, version).label
        out: list[shadowlog.Comparison] = []
        for f in files:
            if f.shadow_log is None:
                continue
            found = shadowlog.compare(
                shadowlog.read(f.shadow_log),
                label,
                f.thresholds,
                primary_model=name,
                since_ns=since_ns,
            )
            out += [c for c in found if c.primary != label]
        if not out:
            logs = [str(f.shadow_log) for f in files if f.shadow_log is not None]
            raise DeploymentError(
                f"no shadow traffic of {label} in {logs or 'any log (no router logs its shadow)'}"
                f": shadow it first (`setsuna models shadow {name} --version {version}`) and "
                "let traffic flow"
            )
        if record:
            self._record(
                "compare",
                name,
                "done",
                "; ".join(
                    f"{label} vs {c.primary}: {c.rows} rows, identical signals "
                    f"{c.identical_signals:.4%}, max |d| {c.max_abs_diff:.3g}"
                    for c in out
                ),
                to=version,
                figures={"comparisons": [c.to_json() for c in out]},
            )
        return out

    # ------------------------------------------------------------------ canary, promote

    def canary(self, name: str, percent: float, version: int | None = None) -> deployments.Step:
        """Move ``percent`` % of the keys each arm on ``name`` holds to ``name:version``.

        A canary arm ``<arm>.canary`` beside each such arm; its share can be
        changed again (the next version moves only the keys the new weight
        requires) and 0 ends it. Sticky: a key stays on its side.
        """
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise ConfigError(f"--percent {percent!r}: give a number in [0, 100)")
        if not 0 <= percent < 100:
            raise ConfigError(f"--percent {percent}: give [0, 100) (100 is `promote`)")
        self._index()
        with self._lock("canary", name):
            ready = self._ready(name)
            version = version or max(ready, default=0)
            if version not in ready:
                return self._refuse("canary", name, DeploymentError(self._not_ready(name, version)))
            files = self._routing(name)
            changes, bases = [], set()
            for f in files:
                text, doc = f.read()
                try:
                    new, moved = _with_canary(doc, name, version, percent / 100.0)
                except DeploymentError as exc:
                    return self._refuse("canary", name, exc, to=version)
                bases |= moved
                if new is not None:
                    changes.append(Change(f, text, new.dumps()))
            if not changes:
                return self._refuse(
                    "canary", name, DeploymentError(self._no_route(name, other_than=version))
                )
            took = self._apply(changes)
            return self._record(
                "canary",
                name,
                "done",
                f"{percent:g} % of the keys of {sorted(bases)} on {name}:{version} in "
                f"{', '.join(c.file.model for c in changes)}; every instance took it in "
                f"{took * 1e3:.0f} ms",
                from_version=_only(bases),
                to=version,
                figures={"percent": percent, "switch_ms": round(took * 1e3, 1)},
                changes=changes,
            )

    def promote(self, name: str, version: int | None = None) -> deployments.Step:
        """Make ``name:version`` (default: the canary's, else the newest READY) the only
        version of ``name`` every experiment routes to, and the one a combiner's
        members and a selector's variants name; unload the others once drained.

        A file that already names ``version`` beside an older one (a selector
        comparing both) is left as it is; the older version then stays loaded
        and the note says which file keeps it.
        """
        self._index()
        with self._lock("promote", name):
            ready = self._ready(name)
            files = self._routing(name)
            docs = [(f, *f.read()) for f in files]
            if version is None:
                canaries = {
                    t.version
                    for _, _, d in docs
                    for a, t in d.arms.items()
                    if a.endswith(CANARY_SUFFIX) and t.model == name and d.latest.weights[a] > 0
                }
                version = max(canaries or ready, default=0)
            if version not in ready:
                return self._refuse(
                    "promote", name, DeploymentError(self._not_ready(name, version))
                )
            changes, old = [], set()
            for f, text, doc in docs:
                new, replaced = _promoted(doc, name, version)
                old |= replaced
                if new is not None:
                    changes.append(Change(f, text, new.dumps()))
            for w in self._watched_files():  # a combiner's members, a selector's variants
                if isinstance(w, ExperimentFile):
                    continue
                text = w.text()
                retargeted = _retargeted(text, name, version, w)
                if retargeted is not None:
                    changes.append(Change(w, text, retargeted))
            if not changes:
                return self._refuse(
                    "promote",
                    name,
                    DeploymentConflictError(
                        f"every experiment already routes {name!r} to version {version} only "
                        "(promoted already?): nothing to promote"
                    ),
                    to=version,
                )
            took = self._apply(changes)
            retired, kept, drained = self._retire(name, keep={version})
            note = f"; {kept}" if kept else ""
            return self._record(
                "promote",
                name,
                "done",
                f"{name}:{version} is the only version routed to in "
                f"{', '.join(c.file.model for c in changes)} (every instance took it in "
                f"{took * 1e3:.0f} ms); unloaded {sorted(retired) or 'nothing'} after its "
                f"requests drained ({drained:.2f} s){note}",
                from_version=_only(old),
                to=version,
                figures={
                    "switch_ms": round(took * 1e3, 1),
                    "drain_s": round(drained, 3),
                    "retired": sorted(retired),
                },
                changes=changes,
            )

    def _retire(self, name: str, keep: set[int]) -> tuple[set[int], str, float]:
        """Unload every READY version of ``name`` outside ``keep`` that no file names."""
        live = self._model_folder(name)
        ready = self._ready(name)
        named = _references(self.repo, name)
        candidates = ready - keep
        blocked = {v: named[v] for v in candidates if v in named}
        go = candidates - set(blocked)
        began = time.monotonic()
        if go:
            retired = self._retired(name)
            retired.mkdir(parents=True, exist_ok=True)
            for v in sorted(go):
                target = retired / str(v)
                if target.exists():  # a leftover of an earlier retire of the same number
                    shutil.rmtree(target)
                (live / str(v)).rename(target)
            publish.fsync_dir(live)
            publish.fsync_dir(retired)
            self._load(name)
            self._wait_versions(name, ready=ready - go, gone=go)
        kept = "; ".join(
            f"{name}:{v} stays loaded: still named by {', '.join(sorted(set(w)))}"
            for v, w in sorted(blocked.items())
        )
        return go, kept, time.monotonic() - began

    # ------------------------------------------------------------------ rollback

    def rollback(self) -> deployments.Step:
        """Restore every experiment file to what it was before the newest step not yet
        undone; versions it names that were unloaded are loaded back first."""
        self._index()
        with self._lock("rollback", "*"):
            step = deployments.last_undoable(self._records)
            if step is None:
                return self._refuse(
                    "rollback", "*", DeploymentError(f"nothing to roll back in {self.audit_db}")
                )
            self._step = ("rollback", step.model)  # recorded under the model it undoes
            files = {f.model: f for f in self._watched_files()}
            changes = []
            for model, texts in step.experiments.items():
                f = files.get(model)
                if f is None:
                    return self._refuse(
                        "rollback",
                        step.model,
                        DeploymentError(f"{model} (changed by step {step.id}) is gone"),
                    )
                now = f.text()
                if step.outcome == "started" and now == texts["before"]:
                    continue  # an interrupted step that never wrote this file
                if now != texts["after"]:
                    return self._refuse(
                        "rollback",
                        step.model,
                        DeploymentConflictError(
                            f"{f.path} changed since step {step.id} ({step.action} by "
                            f"{step.who}): someone else has moved on; look at `setsuna models "
                            "history` and roll back by hand if you must"
                        ),
                    )
                changes.append(Change(f, now, str(texts["before"])))
            began = time.monotonic()
            restored = self._restore_versions(changes)
            took = self._apply(changes)
            total = time.monotonic() - began
            return self._record(
                "rollback",
                step.model,
                "done",
                f"undid step {step.id} ({step.action} {step.model} by {step.who}): the arm set "
                f"before it serves again; every instance took it in {took * 1e3:.0f} ms"
                + (f" after loading back {sorted(restored)}" if restored else ""),
                from_version=step.to_version,
                to=step.from_version,
                figures={
                    "switch_ms": round(took * 1e3, 1),
                    "total_s": round(total, 3),
                    "reloaded": sorted(restored),
                },
                changes=changes,
                undoes=step.id,
            )

    def _restore_versions(self, changes: Sequence[Change]) -> list[str]:
        """Load back every version the restored files name that is not READY."""
        need: dict[str, set[int]] = {}
        for c in changes:
            for model, version in _all_targets(json.loads(c.after)):
                need.setdefault(model, set()).add(version)
        restored = []
        for model, versions in sorted(need.items()):
            missing = versions - self._ready(model)
            if not missing:
                continue
            live = self._model_folder(model)
            retired = self._retired(model)
            for v in sorted(missing):
                if not (live / str(v)).is_dir():
                    if not (retired / str(v)).is_dir():
                        raise DeploymentError(
                            f"{model}:{v} is neither in {live} nor retired in {retired}: "
                            "cannot roll back to it"
                        )
                    (retired / str(v)).rename(live / str(v))
            publish.fsync_dir(live)
            ready = self._ready(model)
            self._load(model)
            self._wait_versions(model, ready=ready | missing, gone=set())
            restored += [f"{model}:{v}" for v in sorted(missing)]
        return restored

    # ------------------------------------------------------------------ experiment files

    def _watched_files(self) -> list[WatchedFile]:
        """Every model serving from a watched file; experiments as :class:`ExperimentFile`."""
        out: list[WatchedFile] = []
        for folder in sorted(p for p in self.repo.iterdir() if p.is_dir()):
            if folder.name.startswith(".") or not (folder / CONFIG_NAME).is_file():
                continue
            try:
                cfg = model_config.load(folder / CONFIG_NAME)
            except ConfigError:
                continue
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            instances = sum(g.count or 1 for g in cfg.instance_group) or 1
            for parameter in ("experiment_file", *_OTHER_FILES):
                if parameter not in params:
                    continue
                path = _under(folder, params[parameter])
                if parameter != "experiment_file":
                    out.append(WatchedFile(folder.name, path, instances, parameter))
                    continue
                log = params.get("shadow_log")
                versions = sorted(int(p.name) for p in folder.iterdir() if _is_version(p))
                own = folder / str(versions[-1]) / signal.THRESHOLDS_FILE if versions else None
                thresholds = (
                    signal.load_thresholds(own) if own and own.is_file() else self._thresholds()
                )
                out.append(
                    ExperimentFile(
                        folder.name,
                        path,
                        instances,
                        parameter,
                        _under(folder, log) if log else None,
                        thresholds,
                    )
                )
        return out

    def _experiment_files(self) -> list[ExperimentFile]:
        return [f for f in self._watched_files() if isinstance(f, ExperimentFile)]

    def _thresholds(self) -> signal.Thresholds:
        """The ``signal`` model's newest thresholds (what ``decision`` applies), else defaults."""
        folder = self.repo / "signal"
        versions = (
            sorted(int(p.name) for p in folder.iterdir() if _is_version(p))
            if folder.is_dir()
            else []
        )
        for v in reversed(versions):
            path = folder / str(v) / signal.THRESHOLDS_FILE
            if path.is_file():
                return signal.load_thresholds(path)
        return signal.Thresholds()

    def _routing(self, name: str, *, shadows_too: bool = False) -> list[ExperimentFile]:
        """The experiment files with an arm on ``name`` (or, ``shadows_too``, a shadow)."""
        out = []
        for f in self._experiment_files():
            _, doc = f.read()
            if any(t.model == name for t in doc.arms.values()) or (
                shadows_too and doc.shadow is not None and doc.shadow.model == name
            ):
                out.append(f)
        return out

    def _begin(self, changes: Sequence[Change] = (), **versions: int | None) -> None:
        """Record the step as ``started`` before it touches anything (its row is updated at
        the end): a step killed midway stays on record with the files it was replacing."""
        if self._intent is not None:
            return
        action, name = self._step
        self._intent = deployments.record(
            self._records,
            action=action,
            model=name,
            outcome="started",
            detail=f"{action} {name}: started; no outcome recorded (still running, or the "
            "process died: `setsuna models rollback` undoes its files)",
            who=self.who,
            from_version=versions.get("from_version"),
            to_version=versions.get("to"),
            experiments={c.file.model: {"before": c.before, "after": c.after} for c in changes},
        ).id

    def _apply(self, changes: Sequence[Change]) -> float:
        """Write every file, wait until every instance serves it; undo all if one does not."""
        self._begin(changes)
        began = time.monotonic()
        for c in changes:
            _write_atomic(c.file.path, c.after)
        try:
            self._settle(changes, lambda c: c.after)
        except DeploymentError as exc:
            for c in changes:
                _write_atomic(c.file.path, c.before)
            try:
                self._settle(changes, lambda c: c.before)
            except DeploymentError as again:
                detail = f"{exc}; the old files are back on disk, but: {again}"
            else:
                detail = f"{exc}; the old files are back in force"
            self._record(*self._step, "failed", detail, changes=changes, raise_as=DeploymentError)
        return time.monotonic() - began

    def _settle(self, changes: Sequence[Change], text: Any) -> None:
        want = {c.file.model: (file_digest(text(c).encode()), c.file.instances) for c in changes}
        deadline = time.monotonic() + self.settings.settle_timeout_s
        while True:
            seen = self._digests()
            late = {
                m: sorted(v for v in seen.get(m, {}).values() if v != d)
                for m, (d, n) in want.items()
                if len(seen.get(m, {})) < n or any(v != d for v in seen[m].values())
            }
            if not late:
                return
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"{sorted(late)} did not take the new experiment file within "
                    f"{self.settings.settle_timeout_s:g} s (an instance refused it: see "
                    "setsuna_router_reload_failures_total and the server log for why)"
                )
            time.sleep(_POLL_S)

    def _digests(self) -> dict[str, dict[str, int]]:
        """Per model, per instance: the digest of the file it serves (from the metrics)."""
        import urllib.request

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                text = r.read().decode()
        except OSError as exc:
            raise DeploymentError(
                f"cannot read the server's metrics at {self.metrics_url} ({exc}): give "
                "--metrics-url, where the instances report the file they serve"
            ) from None
        out: dict[str, dict[str, int]] = {}
        for line in text.splitlines():
            if not line.startswith(_DIGEST_METRIC + "{"):
                continue
            labels, _, value = line[len(_DIGEST_METRIC) + 1 :].rpartition("} ")
            pairs = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
            model = pairs.get("model", "").strip('"')
            instance = pairs.get("instance", "").strip('"')
            out.setdefault(model, {})[instance] = int(float(value))
        return out

    # ------------------------------------------------------------------ Triton

    def check_token(self) -> None:
        """Raise ServerError unless the server accepts this lifecycle's admin token."""
        self._index()

    def _client(self) -> Any:
        if self._grpc is None:
            import tritonclient.grpc as grpcclient

            self._grpc = grpcclient.InferenceServerClient(self.url)
        return self._grpc

    def _index(self) -> list[dict[str, Any]]:
        from setsuna.server import ADMIN_TOKEN_ENV

        try:
            index = self._client().get_model_repository_index(
                headers=self.headers, as_json=True, client_timeout=10
            )
        except Exception as exc:
            text = _message(exc)
            if "restricted" in text or "admin" in text.lower():
                raise ServerError(
                    "the lifecycle uses the repository API, which needs the admin token: set "
                    f"{ADMIN_TOKEN_ENV} to the server's token ({text})"
                ) from None
            raise ServerError(f"cannot reach the Triton server at {self.url}: {text}") from None
        return list(index.get("models", []))

    def _states(self, name: str) -> dict[int, str]:
        return {
            int(m["version"]): str(m.get("state", ""))
            for m in self._index()
            if m.get("name") == name and str(m.get("version", "")).isdigit()
        }

    def _ready(self, name: str) -> set[int]:
        return {v for v, s in self._states(name).items() if s == "READY"}

    def _load(self, name: str) -> None:
        try:
            self._client().load_model(
                name, headers=self.headers, client_timeout=self.settings.load_timeout_s
            )
        except Exception as exc:
            raise DeploymentError(f"Triton refused to load {name!r}: {_message(exc)}") from None

    def _wait_versions(self, name: str, *, ready: set[int], gone: set[int]) -> None:
        """Until every version of ``ready`` is READY and none of ``gone`` is loaded."""
        deadline = time.monotonic() + max(
            self.settings.load_timeout_s, self.settings.drain_timeout_s
        )
        while True:
            states = self._states(name)
            bad = {v: states.get(v, "absent") for v in ready if states.get(v) != "READY"}
            busy = {
                v: states[v] for v in gone if states.get(v) in ("READY", "UNLOADING", "LOADING")
            }
            if not bad and not busy:
                return
            failed = {v: s for v, s in bad.items() if s == "UNAVAILABLE"}
            if failed:
                reasons = {
                    int(m["version"]): m.get("reason", "")
                    for m in self._index()
                    if m.get("name") == name and int(m.get("version", 0)) in failed
                }
                raise DeploymentError(
                    "; ".join(f"{name}:{v} UNAVAILABLE: {reasons.get(v) or '?'}" for v in failed)
                )
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"{name}: versions {bad or busy} not settled within "
                    f"{max(self.settings.load_timeout_s, self.settings.drain_timeout_s):g} s"
                )
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ bookkeeping

    def _model_folder(self, name: str) -> Path:
        folder = self.repo / name
        if name.startswith(".") or "/" in name or not (folder / CONFIG_NAME).is_file():
            raise DeploymentError(f"no model {name!r} in {self.repo}")
        return folder

    def _retired(self, name: str) -> Path:
        return state_dir(self.repo) / "retired" / name

    @contextmanager
    def _lock(self, action: str, name: str) -> Iterator[None]:
        state = state_dir(self.repo)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state / "lifecycle.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "?"
                raise DeploymentConflictError(
                    f"another lifecycle step is running on {self.repo}: {holder}; wait for it "
                    "to finish, then look at `setsuna models history` before trying again"
                ) from None
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            holder = f"{action} {name} by {self.who} since {stamp} UTC"
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
            with self._records_lock(holder):
                self._step, self._intent = (action, name), None
                yield
        finally:
            self._intent = None
            os.close(fd)

    @contextmanager
    def _records_lock(self, holder: str) -> Iterator[None]:
        """With PostgreSQL records, also PostgreSQL's advisory lock: operators on other hosts
        (other state folders, other flocks) share those records and their rollback stack."""
        held = ExitStack()
        try:
            if self._records.is_postgres:
                held.enter_context(statedb.advisory_lock(self._records, RECORDS_LOCK, holder))
        except statedb.LockHeldError as exc:
            raise DeploymentConflictError(
                f"another lifecycle step is running against the deployment records "
                f"{self._records}: {exc.holder}; wait for it to finish, then look at "
                "`setsuna models history` before trying again"
            ) from None
        except statedb.StateError as exc:
            raise AuditError(str(exc)) from None
        with held:
            yield

    def _record(
        self,
        action: str,
        name: str,
        outcome: str,
        detail: str,
        *,
        from_version: int | None = None,
        to: int | None = None,
        figures: Mapping[str, Any] | None = None,
        changes: Sequence[Change] = (),
        undoes: int | None = None,
        raise_as: type[SetsunaError] | None = None,
    ) -> deployments.Step:
        fields: dict[str, Any] = {
            "outcome": outcome,
            "detail": detail,
            "from_version": from_version,
            "to_version": to,
            "figures": figures,
            "experiments": {c.file.model: {"before": c.before, "after": c.after} for c in changes},
            "undoes": undoes,
        }
        if self._intent is not None:
            step = deployments.finish(self._records, self._intent, **fields)
            self._intent = None
        else:
            step = deployments.record(
                self._records, action=action, model=name, who=self.who, **fields
            )
        if raise_as is not None:
            raise raise_as(f"{detail} (recorded as step {step.id})")
        return step

    def _refuse(
        self,
        action: str,
        name: str,
        exc: BaseException,
        *,
        from_version: int | None = None,
        to: int | None = None,
    ) -> deployments.Step:
        cls = type(exc) if isinstance(exc, SetsunaError) else DeploymentError
        if not issubclass(cls, DeploymentError):
            cls = DeploymentError
        return self._record(
            action,
            name,
            "refused",
            f"{action} {name}: {exc}; nothing changed",
            from_version=from_version,
            to=to,
            raise_as=cls,
        )

    def _serving_text(self, name: str, versions: set[int]) -> str:
        return ", ".join(f"{name}:{v}" for v in sorted(versions)) or "nothing"

    def _not_ready(self, name: str, version: int) -> str:
        return (
            f"{name}:{version} is not READY on the server (READY: "
            f"{self._serving_text(name, self._ready(name))}): publish it first"
        )

    def _no_route(self, name: str, other_than: int | None = None) -> str:
        extra = f" other than version {other_than}" if other_than else ""
        return f"no experiment (router, decide) routes keys to {name!r}{extra}"


# ---------------------------------------------------------------------- documents


def preflight_child(folder: str, batches: str = "8") -> None:
    """In a child process: verify ``folder``, load its engine, score warm-up rows.

    Exits non-zero (the reason on stderr) when any of it fails or a score is
    non-finite where the schema does not allow NaN.
    """
    import sys

    from setsuna import runtime

    try:
        m = manifest.verify_sealed(Path(folder))
        engine = runtime.load(m.engine, Path(folder), m.engine_params)
        rng = np.random.default_rng(0)
        shape = m.schema.row_shape
        for i in range(int(batches)):
            rows = 1 if i % 2 == 0 else 8
            x = np.zeros((1, *shape), np.float32) if i == 0 else rng.normal(size=(rows, *shape))
            y = np.asarray(engine.predict(np.ascontiguousarray(x, dtype=np.float32)))
            if not m.schema.allow_nan and not np.isfinite(y).all():
                raise DeploymentError(f"warm-up batch {i + 1} answered non-finite scores")
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        raise SystemExit(1) from None


def _with_canary(
    doc: ExperimentDoc, name: str, version: int, share: float
) -> tuple[ExperimentDoc | None, set[int]]:
    """``doc`` with ``share`` of each arm on ``name`` (not ``version``) in its canary arm."""
    arms = dict(doc.arms)
    weights = dict(doc.latest.weights)
    bases = [
        a
        for a, t in doc.arms.items()
        if t.model == name and t.version != version and not a.endswith(CANARY_SUFFIX)
    ]
    moved = set()
    for a in bases:
        c = a + CANARY_SUFFIX
        held = arms.get(c)
        if held is not None and held != Target(name, version) and weights.get(c, 0.0) > 0:
            raise DeploymentConflictError(
                f"arm {c!r} of experiment {doc.name!r} is a canary of {held.label} at "
                f"{weights[c]:.2%}: promote it or roll it back first"
            )
        total = weights[a] + weights.get(c, 0.0)
        arms[c] = Target(name, version)
        weights[c] = total * share
        weights[a] = total - weights[c]
        moved.add(doc.arms[a].version)
    if not bases:
        return None, moved
    new = ExperimentDoc(doc.name, doc.salt, arms, doc.versions, doc.shadow)
    base = ExperimentDoc.from_json(new.to_json(), origin=f"experiment {doc.name!r}")
    return base.then(weights), moved


def _promoted(doc: ExperimentDoc, name: str, version: int) -> tuple[ExperimentDoc | None, set[int]]:
    """``doc`` with every arm on ``name`` retargeted to ``version`` and canaries folded in."""
    target = Target(name, version)
    weights = dict(doc.latest.weights)
    arms = dict(doc.arms)
    replaced = {t.version for t in doc.arms.values() if t.model == name and t.version != version}
    for a, t in doc.arms.items():
        if t.model != name:
            continue
        base = a[: -len(CANARY_SUFFIX)] if a.endswith(CANARY_SUFFIX) else None
        if base is not None and base in arms and arms[base].model == name and weights[a] > 0:
            weights[base] += weights[a]
            weights[a] = 0.0
        arms[a] = target
    shadow = None if doc.shadow == target else doc.shadow
    folds = any(
        a.endswith(CANARY_SUFFIX) and t.model == name and doc.latest.weights[a] > 0
        for a, t in doc.arms.items()
    )
    if not replaced and not folds and shadow == doc.shadow:
        return None, replaced
    new = ExperimentDoc(doc.name, doc.salt, arms, doc.versions, shadow)
    base_doc = ExperimentDoc.from_json(new.to_json(), origin=f"experiment {doc.name!r}")
    return base_doc.then(weights), replaced


#: Watched files other than experiments: the parameter naming them, and their validator.
_OTHER_FILES: Final = {"members_file": members.loads, "selector_file": selection.loads}


def _retargeted(text: str, name: str, version: int, f: WatchedFile) -> str | None:
    """``text`` with every ``{"model": name, "version": v}`` on ``version``; None when
    nothing changes, or when the file names ``version`` already (retargeting would
    list it twice: the file keeps what it names, and promote says so)."""
    doc = json.loads(text)
    found = {v for m, v in _all_targets(doc) if m == name}
    if not found - {version} or version in found:
        return None

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("model") == name and isinstance(node.get("version"), int):
                node = {**node, "version": version}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out = json.dumps(walk(doc), indent=2) + "\n"
    _OTHER_FILES[f.parameter](out.encode(), str(f.path))  # as the model will validate it
    return out


def _all_targets(doc: Any) -> Iterator[tuple[str, int]]:
    """Every ``{"model": m, "version": v}`` in a JSON document."""
    if isinstance(doc, dict):
        m, v = doc.get("model"), doc.get("version")
        if isinstance(m, str) and isinstance(v, int) and not isinstance(v, bool):
            yield m, v
        for x in doc.values():
            yield from _all_targets(x)
    elif isinstance(doc, list):
        for x in doc:
            yield from _all_targets(x)


def _references(repo: Path, name: str) -> dict[int, list[str]]:
    """Versions of ``name`` that a model's JSON files (members, selector, experiment) name."""
    out: dict[int, list[str]] = {}
    for folder in repo.iterdir():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        for f in folder.glob("*.json"):
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            for v in {v for m, v in _all_targets(doc) if m == name}:
                out.setdefault(v, []).append(f"{folder.name}/{f.name}")
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step: readers see the old file or the new one, never part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
        publish.fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _io(tensors: Any) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(t.name, int(t.data_type), tuple(int(d) for d in t.dims)) for t in tensors]


def _is_version(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and p.name.isdigit()


def _under(folder: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else folder / p


def _only(versions: set[int]) -> int | None:
    return next(iter(versions)) if len(versions) == 1 else None


def _message(exc: BaseException) -> str:
    m = exc.message() if hasattr(exc, "message") else None
    return str(m or exc)


def admin_headers() -> dict[str, str]:
    """gRPC metadata with ``$SETSUNA_ADMIN_TOKEN``; refused clearly when it is unset."""
    from setsuna.models import env_admin_headers

    return env_admin_headers("the lifecycle changes what the server serves")


# ---------------------------------------------------------------------- CLI

DEFAULT_METRICS_URL: Final = "http://127.0.0.1:8002/metrics"


def register_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the lifecycle verbs to ``setsuna models`` (see :mod:`setsuna.cli`)."""
    verbs = {
        "publish": "add a build of NAME as version N+1 beside N, loaded and warmed up",
        "shadow": "copy live traffic of NAME's experiments to a version (never answered)",
        "compare": "the shadow against the serving version on that traffic",
        "canary": "move PERCENT %% of the keys on NAME to its newest version (sticky)",
        "promote": "make a version the only one routed to; unload the others",
        "rollback": "restore the arm set before the newest step not yet undone",
        "history": "every lifecycle step: who, when, from which version to which",
    }
    for verb, text in verbs.items():
        q = sub.add_parser(verb, help=text)
        if verb not in ("rollback", "history"):
            q.add_argument("name")
        elif verb == "history":
            q.add_argument("name", nargs="?")
        if verb == "publish":
            q.add_argument("--from", dest="build", type=Path, required=True, help="the build")
        if verb in ("shadow", "compare", "canary", "promote"):
            q.add_argument("--version", type=int, default=None)
        if verb == "shadow":
            q.add_argument("--clear", action="store_true", help="stop shadowing")
        if verb == "compare":
            q.add_argument("--since-s", type=float, default=None, help="only the last S seconds")
        if verb == "canary":
            q.add_argument("--percent", type=float, required=True)
        q.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
        q.add_argument("--metrics-url", default=DEFAULT_METRICS_URL)
        q.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
        q.add_argument(
            "--audit-db",
            default=None,
            help="deployment records: a SQLite path or a postgresql://user@host/db URL "
            "(no password in it: PGPASSWORD, PGPASSFILE or ~/.pgpass)",
        )
        q.add_argument("--json", action="store_true")
        q.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    life = Lifecycle(
        args.model_repository,
        args.url,
        admin_headers(),
        metrics_url=args.metrics_url,
        audit_db=args.audit_db,
    )
    if args.action == "history":
        life.check_token()  # every verb, reading included, answers to the server's token
        steps = deployments.history(life._records, args.name)
        if args.json:
            print(json.dumps([s.to_json() for s in steps], indent=2))
        for s in [] if args.json else steps:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.t_ns / 1e9))
            print(f"{s.id:>4} {when} {s.action:<8} {s.model:<12} {s.outcome:<8} {s.who}")
            print(f"       {s.detail}")
        return 0
    if args.action == "compare":
        since = 0 if args.since_s is None else time.time_ns() - int(args.since_s * 1e9)
        found = life.compare(args.name, args.version, since_ns=since)
        if args.json:
            print(json.dumps([c.to_json() for c in found], indent=2))
        for c in [] if args.json else found:
            print(
                f"{c.shadow} vs {c.primary}: {c.rows} rows in {c.batches} batches "
                f"({c.errors} failed), identical signals {c.identical_signals:.4%}, "
                f"max |d| {c.max_abs_diff:.3g} (mean {c.mean_abs_diff:.3g}), latency p50/p99 "
                f"{c.primary_p50_us:.0f}/{c.primary_p99_us:.0f} us vs "
                f"{c.shadow_p50_us:.0f}/{c.shadow_p99_us:.0f} us per batch"
            )
        return 0
    step = {
        "publish": lambda: life.publish(args.name, args.build),
        "shadow": lambda: life.shadow(args.name, args.version, clear=args.clear),
        "canary": lambda: life.canary(args.name, args.percent, args.version),
        "promote": lambda: life.promote(args.name, args.version),
        "rollback": life.rollback,
    }[args.action]()
    print(json.dumps(step.to_json(), indent=2) if args.json else step.detail)
    return 0
