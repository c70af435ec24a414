"""Inside Triton's Python stub: import nothing from the repository but a sealed model.py.

The 2.51 stub imports a model as ``<version>.model`` with the model folder
and the version folder appended to ``sys.path``, the normal Python way. So
whatever sits in those folders can run before any check in ``model.py``
does: a planted ``__pycache__/model.<tag>.pyc`` or ``model.<abi>.so`` wins
over ``model.py``, a ``<version>/__init__.py`` runs first, a ``numbers.py``
beside it shadows nothing but a missing optional module would be found there.
And the repository API's ``file:`` overrides load a model from a temporary
folder outside the repository altogether.

The launcher (:mod:`setsuna.server`) installs a ``.pth`` line into the venv
that calls :func:`install` when ``$SETSUNA_STUB_GUARD`` is set; it acts only in
the ``triton_python_backend_stub`` executable. :func:`install` puts a finder
first on ``sys.meta_path`` that

* lets the version package (a namespace package: the folder itself) through,
* answers ``<version>.model`` itself, after :func:`setsuna.seal.verify_version`
  of that folder (signature, config, every file, nothing planted), by
  compiling the very bytes that were verified (no second read, no bytecode
  cache: ``sys.dont_write_bytecode`` and no ``.pyc`` is ever consulted),
* refuses every other module found inside the model repository, and any
  ``<version>.model`` outside it (a ``file:`` override), with an
  ``ImportError`` that Triton reports as the load failure's reason.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

GUARD_ENV: Final = "SETSUNA_STUB_GUARD"
ROOT_ENV: Final = "SETSUNA_MODEL_ROOT"
STUB_EXECUTABLE: Final = "triton_python_backend_stub"
PTH_NAME: Final = "setsuna_stub_guard.pth"
#: The .pth line: one dict lookup in every other interpreter of the venv. It fails
#: closed: ``site`` would print an exception raised here and go on unguarded.
PTH_LINE: Final = (
    "import os; exec(\"if os.environ.get('SETSUNA_STUB_GUARD') == '1':\\n"
    " try:\\n  import setsuna.stub_guard as g; g.install()\\n"
    " except BaseException as e:\\n"
    "  import sys; print('setsuna: stub guard failed:', repr(e), file=sys.stderr); os._exit(70)"
    '")\n'
)


class _Source(importlib.abc.Loader):
    """Executes ``source`` (already verified) as the module; never touches bytecode caches."""

    def __init__(self, path: str, source: bytes) -> None:
        self.path, self.source = path, source

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        code = compile(self.source, self.path, "exec", dont_inherit=True)
        exec(code, module.__dict__)


class RepositoryGuard(importlib.abc.MetaPathFinder):
    """The finder described in the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _inside(self, location: str) -> bool:
        try:
            return Path(location).resolve().is_relative_to(self.root)
        except (OSError, ValueError):
            return True  # unresolvable: treat as ours and refuse

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        head, _, tail = fullname.partition(".")
        if tail == "model" and head.isdigit() and path is not None:
            return self._model(fullname, list(path))
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        origin = spec.origin if spec.has_location else None
        places = [origin] if origin else []
        places += list(spec.submodule_search_locations or [])
        if not any(self._inside(p) for p in places):
            return spec
        namespace = _is_namespace(spec)
        if namespace and fullname.isdigit():
            return spec  # the version folder as a package; its modules are checked above
        where = origin or ", ".join(places)
        raise ImportError(
            f"setsuna: refusing to import {fullname!r} from {where}: inside the model "
            "repository only a version folder's sealed model.py may be imported "
            "(a planted module?)"
        )

    def _model(self, fullname: str, path: list[str]) -> importlib.machinery.ModuleSpec:
        from setsuna.errors import SetsunaError
        from setsuna.seal import verify_version  # here: the .pth line must stay cheap

        if len(path) != 1 or not self._inside(path[0]):
            raise ImportError(
                f"setsuna: refusing to load model code from {path}: models load only from "
                f"the model repository {self.root} (the repository API's file: overrides "
                "are not served)"
            )
        folder = Path(path[0]).resolve()
        if folder.parent.parent != self.root:
            raise ImportError(f"setsuna: {folder} is not <repository>/<model>/<version>")
        try:
            verified = verify_version(folder)
        except SetsunaError as exc:
            raise ImportError(f"setsuna: {exc}") from None
        if verified.model_py is None:
            raise ImportError(f"setsuna: {folder} has no sealed model.py")
        origin = str(folder / "model.py")
        spec = importlib.util.spec_from_loader(
            fullname, _Source(origin, verified.model_py), origin=origin
        )
        assert spec is not None
        spec.has_location = True
        return spec


def _is_namespace(spec: importlib.machinery.ModuleSpec) -> bool:
    loader = type(spec.loader).__name__ if spec.loader is not None else ""
    return spec.origin in (None, "namespace") or loader == "NamespaceLoader"


def in_stub() -> bool:
    try:
        return Path("/proc/self/exe").readlink().name == STUB_EXECUTABLE
    except OSError:
        return False


def install() -> None:
    """Guard this interpreter if it is a Python-backend stub (called from the .pth line)."""
    if not in_stub():
        return
    root = os.environ.get(ROOT_ENV)
    if not root:
        raise RuntimeError(f"setsuna: ${GUARD_ENV} is set without ${ROOT_ENV}")
    sys.dont_write_bytecode = True
    sys.meta_path.insert(0, RepositoryGuard(Path(root)))


def active() -> bool:
    """Whether this interpreter's imports go through a :class:`RepositoryGuard`."""
    return any(isinstance(f, RepositoryGuard) for f in sys.meta_path)


def require() -> None:
    """Refuse to go on in a stub the launcher meant to guard but that is not guarded.

    The .pth line can be skipped silently (an unreadable file, another
    venv); a model that finds itself unguarded refuses to load rather than
    serve from a repository nothing checked.
    """
    if os.environ.get(GUARD_ENV) == "1" and in_stub() and not active():
        raise ImportError(
            f"setsuna: ${GUARD_ENV} is set but the stub guard is not installed "
            f"({PTH_NAME} missing or unreadable in the stub's venv): restart the server "
            "with `python -m setsuna.server`, which writes it"
        )
