"""What the tree converters need to know about a source's forest.

Which scikit-learn estimators are tree ensembles decides whether the compiled
engines apply at all (a LogisticRegression source gets ONNX only), and treelite's
in-memory model is what both tl2cgen and the FIL file start from: one place
for both, so the engines cannot disagree on either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from build_engines.base import Source

if TYPE_CHECKING:
    import treelite

#: Source kinds :func:`build_engines.candidates.trees.convert` takes.
TREE_KINDS = ("lightgbm", "xgboost", "sklearn")


def is_tree_ensemble(estimator: Any) -> bool:
    """True for the scikit-learn forests and boosters treelite imports."""
    from sklearn import ensemble

    kinds = (
        ensemble.RandomForestClassifier,
        ensemble.RandomForestRegressor,
        ensemble.ExtraTreesClassifier,
        ensemble.ExtraTreesRegressor,
        ensemble.GradientBoostingClassifier,
        ensemble.GradientBoostingRegressor,
        ensemble.HistGradientBoostingClassifier,
        ensemble.HistGradientBoostingRegressor,
    )
    return isinstance(estimator, kinds)


def is_forest(source: Source) -> bool:
    """Whether the compiled tree engines (tl2cgen, FIL) apply to ``source``."""
    return source.kind != "sklearn" or is_tree_ensemble(source.model)


def to_treelite(source: Source) -> treelite.Model:
    """treelite's model of the source's forest (LightGBM, XGBoost or scikit-learn)."""
    import treelite

    if source.kind == "lightgbm":
        return treelite.frontend.from_lightgbm(source.model)
    if source.kind == "xgboost":
        return treelite.frontend.from_xgboost_json(bytes(source.model.save_raw(raw_format="json")))
    import treelite.sklearn

    return treelite.sklearn.import_model(source.model)
