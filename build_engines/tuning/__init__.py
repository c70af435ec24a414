"""Tune each model's Triton config with perf_analyzer, the way Model Analyzer does.

    make perf                                   # perf-setup, engines, then this
    python -m build_engines.tuning [--models lightgbm,lstm] [--quick] [--no-write-tuned]

For every model in the built repository (``make build-engines`` first) this
serves copies that differ only in ``config.pbtxt`` (built with the builder's
own :func:`~build_engines.repository.build_config`) and measures each with
Triton's ``perf_analyzer`` against the wheel's real ``tritonserver``, then
merges the chosen knobs per model into ``tuned.json`` beside this package,
which ``python -m build_engines`` reads back. It is part of the build, not a
benchmark: its output decides what the builder writes.

One module per job:

* :mod:`~build_engines.tuning.variants`: the config choices swept;
* :mod:`~build_engines.tuning.served`: a built model and each variant's config;
* :mod:`~build_engines.tuning.sweep`: serving and measuring every variant;
* :mod:`~build_engines.tuning.results`: a variant's runs and their stall check;
* :mod:`~build_engines.tuning.choice`: the choice rule per model;
* :mod:`~build_engines.tuning.report`: report.md, plots, results.json;
* :mod:`~build_engines.tuning.tuned`: reading and writing ``tuned.json``;
* :mod:`~build_engines.tuning.inputs`, :mod:`~build_engines.tuning.perf_analyzer`:
  the rows sent and the load generator (the perf/ scripts use them too).

The run prints an estimate first and stops starting runs after
``--max-minutes``.
"""
