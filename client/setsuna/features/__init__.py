"""Incremental features: a declarative spec, a compiled O(1) engine, the offline path.

``FeatureSpec`` says what is computed (and travels in model manifests);
``FeatureEngine`` computes it online, one compiled call per batch of bars;
``compute_features`` runs the same kernel over a whole history for training.
"""

from setsuna.features._engine import FeatureEngine, FeatureRows
from setsuna.features._offline import compute_features, features_frame
from setsuna.features._spec import KINDS, FeatureDef, FeatureSpec, default_spec

__all__ = [
    "KINDS",
    "FeatureDef",
    "FeatureEngine",
    "FeatureRows",
    "FeatureSpec",
    "compute_features",
    "default_spec",
    "features_frame",
]
