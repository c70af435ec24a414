"""The ``fil`` candidate: the model file Triton's FIL backend loads (container target).

The FIL backend cannot run on this host, so the gate judges the file with
treelite's GTIL reading that same file, and the candidate's notes say what the
gate cannot see (FIL evaluates in float32).
"""

from __future__ import annotations

from pathlib import Path

from build_engines.base import Candidate, ContainerSpec, Source
from build_engines.candidates.compile_cache import package_version
from build_engines.candidates.forests import to_treelite
from build_engines.candidates.trees_onnx import outputs_param

#: Triton FIL: (file name, model_type) per source kind.
FIL_FILES = {
    "lightgbm": ("model.txt", "lightgbm"),
    "xgboost": ("xgboost.json", "xgboost_json"),
    "sklearn": ("checkpoint.tl", "treelite_checkpoint"),
}


def build_fil(source: Source, folder: Path) -> Candidate:
    """Write the file FIL loads, and the config parameters that tell FIL how to read it."""
    filename, model_type = FIL_FILES[source.kind]
    path = folder / filename
    if source.kind == "lightgbm":
        path.write_text(source.model.model_to_string())
    elif source.kind == "xgboost":
        path.write_bytes(bytes(source.model.save_raw(raw_format="json")))
    else:
        to_treelite(source).serialize(path)
    classifier = source.task == "classification"
    parameters = {
        "model_type": model_type,
        # FIL before 25.09 reads "output_class"; 25.09 renamed it "is_classifier"
        # (and still honours "output_class", with a warning). Both are set.
        "output_class": str(classifier).lower(),
        "is_classifier": str(classifier).lower(),
        "predict_proba": str(classifier).lower(),
        "threshold": str(source.decision_threshold),
    }
    if source.classes:
        score = (
            f"FIL's predict_proba output holds the {source.n_outputs} class probabilities "
            f"({', '.join(source.classes)}): the score is that whole row"
        )
    elif classifier:
        score = (
            "FIL's predict_proba output holds per-class probabilities: the score is its last "
            "column (class 1)"
        )
    else:
        score = "FIL's output is the regression value"
    return Candidate(
        name="fil",
        engine="",
        folder=folder,
        params={},
        local=False,
        container=ContainerSpec(
            default_model_filename=filename, backend="fil", parameters=parameters
        ),
        gate_engine="gtil",
        gate_params={
            "file": filename,
            "model_type": model_type,
            "threads": 1,
            **outputs_param(source),
        },
        notes=(
            f"{score}. Judged by treelite {package_version('treelite')} GTIL on this file, in the "
            "model's precision; FIL evaluates in float32, so expect float32-rounding "
            "differences near split thresholds that the gate does not see. The FIL "
            "backend's own treelite must read this format (checkpoints and XGBoost JSON "
            "from newer versions may need a newer Triton)"
        ),
    )
