"""The Python-backend models of :mod:`ensembles`; each served folder's ``model.py`` imports one."""
