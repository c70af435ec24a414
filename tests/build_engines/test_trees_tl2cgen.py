"""tl2cgen's C templates: real files, rendered byte for byte, hashed into the cache key.

No forest is compiled here (``test_trees.py`` compiles the rendered C); these
tests pin what moving the C out of Python strings must not change.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from build_engines.candidates import trees_tl2cgen as tl
from setsuna.errors import SetsunaError

BATCH_VALUES: dict[str, object] = {
    "n_feature": 7,
    "leaf_type": "float",
    "batch_symbol": "setsuna_predict_batch",
    "nfeature_symbol": "setsuna_num_feature",
    "noutput_symbol": "setsuna_num_output",
}
BLOCKED_VALUES: dict[str, object] = {
    **BATCH_VALUES,
    "leaf_type": "double",
    "block": 256,
    "prologue": "  quantize(data);",
    "epilogue": "  result[0] += 0.5;\n  postprocess(result);",
    "unit_loops": "  for (int i = 0; i < m; ++i) { predict_unit0(rows[i], res[i]); }",
}
#: sha256 of what the Python format strings (``_BATCH_C``, ``_BLOCKED_C`` in the
#: old trees.py) produced for the values above. A deliberate template change
#: updates these; the cache key follows the file's text on its own. Updated for
#: issue 15: every class of a 3+-class model is written (SETSUNA_N_WRITE per row)
#: and ``setsuna_num_output`` says how many; binary models write what they did.
FORMAT_STRING_SHA256 = {
    tl.BATCH_C: "1ac7e6251ac008ebe84c389b23d4198f29c7b9b326ca801652a63c3db94c2e6f",
    tl.BLOCKED_C: "eb2a118827f5c4fb605b11c5863b439e64ede14e5efa16f696dd1f10cf0cb00d",
}


@pytest.fixture
def templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copies of the templates that a test may edit, used in place of the real ones."""
    for name in (tl.BATCH_C, tl.BLOCKED_C):
        shutil.copyfile(tl.TEMPLATE_DIR / name, tmp_path / name)
    monkeypatch.setattr(tl, "TEMPLATE_DIR", tmp_path)
    return tmp_path


def test_templates_are_c_files_beside_the_module() -> None:
    # pyproject packages build_engines/candidates/*.c: an installed build finds them.
    for name in (tl.BATCH_C, tl.BLOCKED_C):
        path = Path(tl.__file__).with_name(name)
        assert path.suffix == ".c" and path.is_file()


@pytest.mark.parametrize(
    ("name", "values"), [(tl.BATCH_C, BATCH_VALUES), (tl.BLOCKED_C, BLOCKED_VALUES)]
)
def test_rendering_is_what_the_format_strings_gave(name: str, values: dict[str, object]) -> None:
    out = tl.render(name, values)
    assert hashlib.sha256(out.encode()).hexdigest() == FORMAT_STRING_SHA256[name]
    assert "@" not in out and not out.lstrip().startswith("/*")  # the comment is gone


def test_blocked_source_starts_on_its_own_line() -> None:
    # It is appended to tl2cgen's main.c, which need not end with a blank line.
    assert tl.render(tl.BLOCKED_C, BLOCKED_VALUES).startswith("\n#define SETSUNA_N_FEATURE 7\n")
    assert tl.render(tl.BATCH_C, BATCH_VALUES).startswith('#include "header.h"\n')


def test_values_are_not_scanned_for_placeholders() -> None:
    out = tl.render(tl.BLOCKED_C, {**BLOCKED_VALUES, "prologue": "  /* @epilogue@ */"})
    assert "/* @epilogue@ */" in out


@pytest.mark.parametrize(
    "values",
    [
        {k: v for k, v in BATCH_VALUES.items() if k != "leaf_type"},
        {**BATCH_VALUES, "block": 256},
    ],
    ids=["missing", "extra"],
)
def test_template_and_caller_out_of_step_is_an_error(values: dict[str, object]) -> None:
    with pytest.raises(SetsunaError, match="out of step"):
        tl.render(tl.BATCH_C, values)


@pytest.mark.parametrize("name", [tl.BATCH_C, tl.BLOCKED_C])
def test_the_c_files_text_is_part_of_the_cache_key(templates: Path, name: str) -> None:
    before = tl.compile_key("ab" * 32)
    assert tl.compile_key("ab" * 32) == before  # stable
    assert tl.compile_key("cd" * 32) != before  # and per source
    path = templates / name
    path.write_text(path.read_text() + "/* an edit */\n")
    assert tl.compile_key("ab" * 32) != before


def test_even_a_comment_edit_changes_the_key(templates: Path) -> None:
    """Conservative on purpose: the whole file is hashed, not only what is compiled."""
    path = templates / tl.BATCH_C
    rendered, before = tl.render(tl.BATCH_C, BATCH_VALUES), tl.compile_key("ab" * 32)
    path.write_text(path.read_text().replace("/* setsuna:", "/* setsuna (edited):", 1))
    assert tl.render(tl.BATCH_C, BATCH_VALUES) == rendered
    assert tl.compile_key("ab" * 32) != before
