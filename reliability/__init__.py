"""Hardening probes against a real local Triton: ``python -m reliability`` (``make reliability``).

An operator's tool, like ``make perf``; not part of the test suite. Each
probe sets something up in a throwaway lab (tiny models, its own signing
key and admin token; never ``model_repository/``), acts (a kill -9, a
hostile request, a tampered file, a full disk), observes, and gives a
verdict. The run prints one table (probe | expected | observed | verdict),
writes it to ``.cache/reliability/report.md`` and the figures to
``.cache/reliability/results.json``, and exits 1 if any probe failed.

- :mod:`reliability.server`: the admin key (1), file: overrides (2), HTTP off and
  hostile gRPC (3), a garbled config (14), refusals and an overload burst (15);
- :mod:`reliability.artifacts`: tampered folders (6), a publish killed mid-way (8),
  damaged LightGBM files (13);
- :mod:`reliability.recovery`: a supervised server restart (4), stale shared
  memory (5), a killed stub (9);
- :mod:`reliability.pipeline`: the audit on a full disk (7), a dead model (10);
- :mod:`reliability.ensembles`: router keys, memory, loops and BLS timeouts (11),
  instances on one version (12).

:mod:`reliability.harness` runs each probe in isolation (an exception is a
FAIL row with its message) and owns the lab; :mod:`reliability.report`
holds the :class:`~reliability.report.Probe` result and the outputs.
"""
