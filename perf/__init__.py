"""Measurement scripts (``python -m perf.triton``, ``perf/engines.py``); not shipped."""
