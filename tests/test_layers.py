"""The packages form a stack: none imports a package above it.

``setsuna`` (the SDK) is the bottom; ``build_engines`` and ``ensembles`` are
siblings on it; ``perf``, ``reliability`` and the demo sit on top. Read from
the source with ``ast``, every import statement (module level or inside a
function) counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = {
    "setsuna": ROOT / "client" / "setsuna",
    "build_engines": ROOT / "build_engines",
    "ensembles": ROOT / "ensembles",
}
#: What each package may import of the project's own packages.
ALLOWED = {
    "setsuna": {"setsuna"},
    "build_engines": {"setsuna", "build_engines"},
    "ensembles": {"setsuna", "ensembles"},
}
PROJECT = {"setsuna", "build_engines", "ensembles", "perf", "reliability", "tests"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_package_imports_one_above_it(package: str) -> None:
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package])
        for f in PACKAGES[package].rglob("*.py")
        if imported_packages(f) - ALLOWED[package]
    }
    assert not bad, f"{package} imports above itself: {bad}"


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from perf import triton\n    import ensembles.cache\n")
    assert imported_packages(f) == {"perf", "ensembles"}
