"""The two records every stage of the build passes along: Source and Candidate.

A :class:`Source` is a trained model plus what the gate needs to judge copies
of it: its feature schema, its task, a hash of its serialised form and a
``reference`` function that runs the source library itself. A
:class:`Candidate` is one engine built from it: a staging folder holding only
that engine's files, the runtime kind that loads them
(:mod:`setsuna.runtime`), and how each deployment target serves it. A
:class:`Skipped` says which engine was not built and why, so the report shows
every engine that applies, built or not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from setsuna.schema import FeatureSchema

F32 = npt.NDArray[np.float32]
Task = Literal["classification", "regression"]
SourceKind = Literal["lightgbm", "xgboost", "sklearn", "catboost", "torch", "onnx"]
Target = Literal["local", "container", "container-gpu"]
#: ``container`` is the NGC image on CPUs only (KIND_CPU); ``container-gpu`` its GPU
#: variant (KIND_GPU: TensorRT plans, ONNX Runtime's CUDA/TensorRT providers, FIL on GPU).
TARGETS: tuple[Target, ...] = ("local", "container", "container-gpu")


@dataclass(frozen=True)
class Source:
    """A trained model and its oracle.

    ``reference(x)`` runs the source library on a float32 batch and returns
    float32 ``[n, 1]`` (positive-class probability or regression value), or
    ``[n, C]`` class probabilities for a multiclass classifier (``classes``
    names the C labels in column order): the ground truth every candidate is
    compared with. ``sha256`` hashes the
    model's own serialised form (model text, JSON, ONNX bytes, state dict), so
    the manifest can say which training run an engine came from.
    """

    name: str
    kind: SourceKind
    model: Any
    schema: FeatureSchema
    task: Task
    sha256: str
    reference: Callable[[F32], F32]
    #: How the source library is named in reports, e.g. "lightgbm.Booster.predict".
    reference_label: str
    #: Threshold turning a classifier's probability into a decision.
    decision_threshold: float = 0.5
    #: Class labels, in the column order of ``reference``, for a multiclass
    #: classifier (3 or more); empty for binary classifiers and regressors.
    classes: tuple[str, ...] = ()

    @property
    def n_outputs(self) -> int:
        """Scores per row: the number of classes of a multiclass model, else 1."""
        return len(self.classes) if self.classes else 1


@dataclass(frozen=True)
class ContainerSpec:
    """How the ``container`` target (NGC Triton image) serves a candidate.

    Exactly one of ``platform`` / ``backend`` is set: ``onnxruntime_onnx`` and
    ``tensorrt_plan`` are platforms, ``fil`` is a backend. ``parameters`` are
    the config's string parameters (FIL's ``model_type``, ``output_class`` ...).
    """

    default_model_filename: str
    platform: str = ""
    backend: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    gpu: bool = False


@dataclass(frozen=True)
class Candidate:
    """One engine built from a source, waiting for the gate.

    ``folder`` holds exactly the files to publish. ``engine`` names the
    :mod:`setsuna.runtime` loader that runs it in-process (gate, local target);
    an empty ``engine`` means it cannot run here and ``gate_engine`` names the
    reference runtime used to judge it instead (FIL is judged by treelite's
    GTIL, whose semantics FIL implements). ``container`` is None when the
    container target cannot serve it natively (a compiled .so only the local
    Python backend loads).
    """

    name: str
    engine: str
    folder: Path
    params: Mapping[str, Any] = field(default_factory=dict)
    local: bool = True
    container: ContainerSpec | None = None
    gate_engine: str = ""
    gate_params: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class Skipped:
    """An engine that applies to the source but was not built, and why."""

    name: str
    reason: str


Built = Candidate | Skipped
Converter = Callable[[Source, Path, F32], list[Built]]
