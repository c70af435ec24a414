"""Converters: one source model in, candidate engines out, each in its own staging folder.

``trees`` (and one ``trees_*`` module per tree engine) and ``neural``; the gate
(:mod:`build_engines.gate`) judges what they produce.
"""
