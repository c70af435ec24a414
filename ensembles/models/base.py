"""What every file-driven ensemble model does the same way: params, the watched file, reloads.

``router`` (and ``decide``), ``combiner`` and ``selector`` each serve from one
JSON file in their model folder (experiment, members, selector) that an
operator edits live. :class:`WatchedFileModel` owns that part once:

- the config parameters as strings, the limits (:mod:`ensembles.limits`), the
  repository, ``allow_nan``, and the file's parameter (required);
- the file itself (:class:`ensembles.watch.Watched`, with the instances' shared
  last valid copy), polled at each execute and by a background thread;
- what a poll finds: a refused file is logged and counted in
  ``setsuna_<kind>_reload_failures_total{<kind>=name, instance=...}`` (the
  previous file keeps serving), a note is logged, and a file that took effect
  calls :meth:`WatchedFileModel.took_effect`;
- which file each instance serves: the gauge
  ``setsuna_watched_file_digest{model=name, instance=...}`` holds
  :func:`ensembles.watch.file_digest` of its bytes, so a writer (the
  lifecycle) knows when every instance has taken its file.

A subclass calls :meth:`setup` first in ``initialize`` and
:meth:`start_watching` last, and :meth:`stop_watching` in ``finalize``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import triton_python_backend_utils as pb_utils

from ensembles.limits import Limits
from ensembles.models import common
from ensembles.watch import Change, Poller, Watched, shared_copy
from setsuna.errors import ConfigError

T = TypeVar("T")


class WatchedFileModel(Generic[T]):
    """A Python-backend model serving from one watched JSON file of kind ``KIND``."""

    #: ``router``, ``combiner``, ``selector``: the metric's prefix and label.
    KIND = ""
    #: The config parameter that names the file.
    FILE_PARAMETER = ""

    def setup(self, args: dict[str, Any], loads: Callable[[bytes, str], T]) -> None:
        self.name: str = args["model_name"]
        self.instance = str(args.get("model_instance_name", self.name))
        self.params = common.model_parameters(args)
        if not self.params.get(self.FILE_PARAMETER):
            raise ConfigError(f"{self.name}: config parameter '{self.FILE_PARAMETER}' is required")
        self.limits = Limits.from_parameters(self.params, self.name)
        self.repo = Path(args["model_repository"]).parent
        self.allow_nan = self.flag("allow_nan")
        self.before_watch()
        path = common.config_path(args, self.params[self.FILE_PARAMETER])
        self.watch: Watched[T] = Watched(path, loads, shared=shared_copy(path, self.name))
        self._poll_lock = threading.Lock()
        # Families must outlive their metrics (the stub deletes a family's metrics with it).
        self._failure_family = pb_utils.MetricFamily(
            name=f"setsuna_{self.KIND}_reload_failures_total",
            description=f"{self.FILE_PARAMETER} files refused at reload, per instance (the "
            "previous one kept serving)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._failures = self._failure_family.Metric(
            labels={self.KIND: self.name, "instance": self.instance}
        )
        self._digest_family = pb_utils.MetricFamily(
            name="setsuna_watched_file_digest",
            description=f"48 bits of the sha256 of the {self.FILE_PARAMETER} file in force, "
            "per instance",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._digest = self._digest_family.Metric(
            labels={"model": self.name, "instance": self.instance}
        )
        self._poller: Poller | None = None

    def before_watch(self) -> None:
        """Set up what ``loads`` needs; the file is read right after (hook)."""

    def flag(self, key: str, default: bool = False) -> bool:
        """A ``true``/``false`` config parameter."""
        raw = self.params.get(key, "true" if default else "false").strip().lower()
        if raw not in ("true", "false"):
            raise ConfigError(f"{self.name}: config parameter {key}={raw!r}: give true or false")
        return raw == "true"

    def poll(self) -> None:
        """Look at the file (each execute and the watcher thread call this)."""
        with self._poll_lock:  # one thread at a time reports and publishes a change
            self.report(self.watch.poll())

    def report(self, changes: list[Change]) -> None:
        for change in changes:
            if change.refused:
                self._failures.increment(1)
                pb_utils.Logger.log_error(f"{self.name} ({self.instance}): {change.refused}")
            if change.note:
                pb_utils.Logger.log_warn(f"{self.name} ({self.instance}): {change.note}")
            if change.took_effect:
                self._digest.set(self.watch.digest)
                self.took_effect()

    def took_effect(self) -> None:
        """A new file is in force (hook; the first load included when polled)."""

    def tick(self) -> None:
        """What the watcher thread does each ``watch_interval_ms`` (hook: extend, call super)."""
        self.poll()

    def start_watching(self) -> None:
        self._digest.set(self.watch.digest)
        self.poll()  # a note from the first load, if any
        self._poller = Poller(
            self.tick,
            self.limits.watch_interval_ms / 1e3,
            lambda exc: pb_utils.Logger.log_error(f"{self.name}: watching failed: {exc}"),
            name=f"{self.name}-watch",
        )

    def stop_watching(self) -> None:
        if self._poller is not None:
            self._poller.stop()
