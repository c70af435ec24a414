"""build_engines: trained models in, a gated Triton model repository out.

It owns reading source models (``sources/``), converting them to candidate
engines (``candidates/``), the gate that keeps a candidate only if its
decisions agree with the source on held-out data, the choice per target,
laying out and publishing the repository (``repository``), and the config
tuner (``tuning/``). It imports only :mod:`setsuna`.
"""
