"""No loops: an ensembles model calls engines only.

A router whose arm is the router itself, or ``decision`` (an ensemble that
calls the router), waits on itself: every instance ends up blocked on a call
that can only be answered by a blocked instance. So every model a file names
(arm, shadow, member, variant) must be a *leaf*, and the rule is an allow
list, read from the model's folder in the repository:

- an **engine**: a Python model whose ``model.py`` is setsuna's engine wrapper
  (it imports ``setsuna.backend``), or a model of any other backend
  (``onnxruntime``, ``tensorrt``, ``fil``...), which cannot call models;
- a **declared leaf**: a hand-written Python model whose ``config.pbtxt`` says
  it calls no model (parameter ``leaf`` = ``"true"``).

Everything else is refused with the file: the caller itself, a Triton
``ensemble``, any of this package's models (their ``model.py`` imports
``ensembles.models``: router, decide, combiner, selector, signal, feedback),
an undeclared hand-written Python model, and a model or version that is not
in the repository. What a folder is can change after the check (a folder
rewritten as a router); the call timeouts (:mod:`ensembles.limits`) end such a
loop with an error instead of a hang.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from setsuna.contract import Target, model_name
from setsuna.errors import ConfigError

CONFIG_NAME: Final = "config.pbtxt"
ENGINE_MODULE: Final = "setsuna.backend"
OUR_MODULES: Final = "ensembles.models"
LEAF_PARAMETER: Final = "leaf"
_LEAF_HINT: Final = (
    f'if it calls no model, say so in its {CONFIG_NAME}: parameters {{ key: "{LEAF_PARAMETER}" '
    'value { string_value: "true" } }'
)


def _imports(source: str) -> set[str]:
    """Modules a ``model.py`` imports at its top level."""
    out: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def refusal(repo: Path, caller: str, target: Target) -> str | None:
    """Why ``caller`` may not call ``target`` (None: it is a leaf it may call)."""
    if target.model == caller:
        return "is this model itself: the call would wait on itself for good"
    # Triton loads the callee, not this code: a symlinked model folder is fine here
    # (the name is already a plain folder name, so it cannot climb out with '..').
    folder = repo / model_name(target.model, "callee")
    try:
        text = (folder / CONFIG_NAME).read_text()
    except OSError:
        return f"is not in the model repository {repo} (no {target.model}/{CONFIG_NAME})"
    try:
        cfg = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        return f"has a {CONFIG_NAME} that does not parse ({exc}), so what it calls is unknown"
    if cfg.platform == "ensemble":
        return "is a Triton ensemble: it calls other models, and may call this one"
    version = folder / str(target.version)
    if not version.is_dir():
        return f"has no version folder {version}"
    if (cfg.backend or cfg.platform) != "python":
        return None  # a native backend (onnxruntime, tensorrt, fil...) cannot call models
    code = version / (cfg.default_model_filename or "model.py")
    try:
        imported = _imports(code.read_text())
    except (OSError, SyntaxError, ValueError) as exc:
        return f"has a {code.name} that cannot be read ({exc}), so what it calls is unknown"
    if ENGINE_MODULE in imported:
        return None
    ours = sorted(m for m in imported if m == OUR_MODULES or m.startswith(OUR_MODULES + "."))
    if ours:
        kind = ours[0].rsplit(".", 1)[-1]
        return f"is an ensembles {kind} model, not an engine: it calls other models or no scorer"
    param = cfg.parameters.get(LEAF_PARAMETER)
    if param is not None and param.string_value.strip().lower() == "true":
        return None
    return f"is a hand-written Python model that may call other models; {_LEAF_HINT}"


def check(repo: Path, caller: str, callees: Iterable[tuple[str, Target]], origin: str) -> None:
    """ConfigError naming the first ``(role, target)`` that ``caller`` may not call."""
    for role, target in callees:
        why = refusal(repo, caller, target)
        if why is not None:
            raise ConfigError(
                f"{origin}: {role} {target.label} {why}; point it at an engine (a model that "
                "calls no other model)"
            )
