"""setsuna, the SDK: what trading code imports, and the contracts every other package shares.

It owns the wire contract (:mod:`setsuna.contract`), the feature schema,
manifests and seals of published models, the in-process engine runtimes and
the Python-backend wrapper that serves them, the local Triton launcher and
its guards, the client (:mod:`setsuna.client`), the tick-to-signal pipeline,
the feature engine, market data and the audit log. It imports none of the
project's other packages (``tests/test_layers.py``).
"""
