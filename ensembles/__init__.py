"""ensembles: the Python-backend models that choose an engine and turn its answer into a trade.

It owns the experiment assignment (``experiment``), member and selector files,
the bounds on what a request or file may make them do, the answer cache, and
the models themselves (``models/``: router, decide, combiner, selector,
signal, feedback) with the writer that lays them out (``repository``). It
imports only :mod:`setsuna` (``build_engines`` is a sibling).
"""
