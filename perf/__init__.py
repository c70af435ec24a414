"""Benchmarks that print setsuna's figure beside a peer's or the raw engine's (``perf/engines.py``,
``python -m perf.targets``, ...); not shipped. The config tuner is ``build_engines.tuning``."""
