"""The main job (``make demo``): an application of the SDK on the built engines.

It sits on top of every package (it trains nothing and builds nothing:
``make build-engines`` did that) and replays unseen real market data through
the tick-to-signal pipeline with the audit on; see ``demo/__main__.py``.
"""
