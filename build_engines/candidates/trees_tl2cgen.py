"""The ``tl2cgen`` candidate: treelite -> C -> a shared library (gcc).

tl2cgen generates C for the forest; a batch entry point is added so that
serving is one ctypes call per batch. Where tl2cgen's ``predict`` has its
usual shape the cache-blocked entry point (:data:`BLOCKED_C`) is appended to
its ``main.c``, otherwise the per-row one (:data:`BATCH_C`) is compiled
beside it. Both are real C files in this folder, templates with ``@name@``
placeholders; the rendered C is what the Python format strings they replaced
produced, byte for byte. The library is cached like lleaves' (see
:mod:`build_engines.candidates.compile_cache`), keyed by both C files' whole
text, the tl2cgen parameters and the tool versions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from build_engines.base import Candidate, Source
from build_engines.candidates.compile_cache import cache_key, package_version, publishing
from build_engines.candidates.forests import to_treelite
from build_engines.candidates.trees_onnx import outputs_param
from setsuna.errors import SetsunaError
from setsuna.runtime.trees import (
    TL2CGEN_BATCH_SYMBOL,
    TL2CGEN_LIB,
    TL2CGEN_NFEATURE_SYMBOL,
    TL2CGEN_NOUTPUT_SYMBOL,
)

if TYPE_CHECKING:
    import treelite

#: Extra flags for every tl2cgen compile and link. ``-Bsymbolic`` binds the
#: library's calls to its own ``predict``: every tl2cgen library exports the same
#: symbol names, and two loaded into one process must not call each other's trees.
TL2CGEN_OPTIONS = ("-Wl,-Bsymbolic",)
#: Trees per generated C file: gcc's -O3 time grows faster than linearly with
#: function size, and separate files compile in parallel.
TL2CGEN_TREES_PER_FILE = 25
#: tl2cgen code-generation parameters. ``quantize`` maps each feature once per
#: row to its bin among the model's thresholds (binary search) and compares ints
#: in the trees: identical decisions, and on the 500x63 example it halves
#: latency (43 -> 22 us a row, 38 -> 18 ms per 1024 rows) and compile time.
#: Branch annotation from data (``annotate_in``) was measured too: no gain.
TL2CGEN_PARAMS: dict[str, Any] = {"quantize": 1}
#: Rows the batch entry point scores together, one tree unit (file) at a time:
#: the unit's code stays in cache across the block instead of the whole forest
#: streaming through it for every row. 500x63 example, threads=1, 1024 rows:
#: 60k -> 80k rows/s (block 64: 70k); single-row latency unchanged.
TL2CGEN_BLOCK_ROWS = 256

#: Folder of the C templates (a module attribute so that tests can point it elsewhere).
TEMPLATE_DIR = Path(__file__).resolve().parent
#: The per-row batch entry point, compiled as its own file.
BATCH_C = "tl2cgen_batch.c"
#: The cache-blocked batch entry point, appended to tl2cgen's main.c.
BLOCKED_C = "tl2cgen_blocked.c"

_PLACEHOLDER = re.compile(r"@([a-z_]+)@")
_C_TYPES = {"float32": "float", "float64": "double"}
_UNIT_CALL = re.compile(r"^\s*predict_unit(\d+)\(data, result\);\s*$")
_PREDICT_DEF = "void predict(union Entry* data, int pred_margin,"


def template_text(name: str) -> str:
    """A C template's whole file: what the cache key hashes, comment included."""
    return (TEMPLATE_DIR / name).read_text(encoding="utf-8")


def render(name: str, values: Mapping[str, object]) -> str:
    """The template's C with each ``@name@`` replaced by ``str(values[name])``.

    The leading ``/* ... */`` comment (for readers of the file) is dropped; the
    rest is copied byte for byte. One pass, so a value (tl2cgen's own code) is
    never scanned for placeholders. Every placeholder must have a value and
    every value a placeholder: a template and its caller out of step would
    otherwise compile something else than intended.
    """
    text = template_text(name)
    if text.startswith("/*"):
        text = text[text.index("*/\n") + len("*/\n") :]
    wanted = set(_PLACEHOLDER.findall(text))
    if wanted != set(values):
        raise SetsunaError(
            f"C template {name}: placeholders {sorted(wanted)} but values for "
            f"{sorted(values)}; the template and {__name__} are out of step"
        )
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def compile_key(source_sha256: str) -> str:
    """Cache key of a source's library: everything that changes the compiled code."""
    template = json.dumps(
        [
            template_text(BATCH_C),
            template_text(BLOCKED_C),
            TL2CGEN_BLOCK_ROWS,
            TL2CGEN_OPTIONS,
            TL2CGEN_TREES_PER_FILE,
            TL2CGEN_PARAMS,
        ]
    )
    return cache_key(
        source_sha256,
        "tl2cgen",
        package_version("tl2cgen"),
        package_version("treelite"),
        template,
    )


def _compile_tl2cgen(tmodel: treelite.Model, target: Path) -> None:
    import tl2cgen

    n_files = max(1, tmodel.num_tree // TL2CGEN_TREES_PER_FILE)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp)
        params = {**TL2CGEN_PARAMS, "parallel_comp": n_files}
        with contextlib.redirect_stdout(io.StringIO()):  # tl2cgen prints progress
            tl2cgen.generate_c_code(tmodel, src, params=params)
        main_c = src / "main.c"
        blocked = _blocked_source(tmodel, main_c.read_text())
        if blocked is not None:  # main.c's statics and units are in scope there
            main_c.write_text(main_c.read_text() + blocked)
        else:
            (src / "setsuna_batch.c").write_text(_batch_source(tmodel))
            recipe = json.loads((src / "recipe.json").read_text())
            recipe["sources"].append({"name": "setsuna_batch", "length": 1})
            (src / "recipe.json").write_text(json.dumps(recipe))
        lib = tl2cgen.create_shared(
            "gcc",
            src,
            nthread=os.cpu_count() or 1,
            options=list(TL2CGEN_OPTIONS),
            long_build_time_warning=False,
        )
        with publishing(target) as out:
            shutil.move(lib, out)


def _batch_source(tmodel: treelite.Model) -> str:
    """The per-row batch entry point, compiled as its own file."""
    return render(
        BATCH_C,
        {
            "n_feature": int(tmodel.num_feature),
            "leaf_type": _C_TYPES[str(tmodel.output_type)],
            "batch_symbol": TL2CGEN_BATCH_SYMBOL,
            "nfeature_symbol": TL2CGEN_NFEATURE_SYMBOL,
            "noutput_symbol": TL2CGEN_NOUTPUT_SYMBOL,
        },
    )


def _split_predict(main_c: str) -> tuple[str, list[int], str] | None:
    """tl2cgen's ``predict`` body as (prologue, unit numbers, epilogue), or None.

    None when the generated code is not the expected shape (no unit calls, or
    other statements between them): the caller then keeps the per-row loop.
    """
    start = main_c.find(_PREDICT_DEF)
    if start < 0:
        return None
    open_at = main_c.find("{", start)
    depth, i = 1, open_at + 1
    while depth and i < len(main_c):
        depth += {"{": 1, "}": -1}.get(main_c[i], 0)
        i += 1
    if depth:
        return None
    lines = main_c[open_at + 1 : i - 1].splitlines()
    at = [k for k, line in enumerate(lines) if _UNIT_CALL.match(line)]
    if not at or at != list(range(at[0], at[-1] + 1)):
        return None
    units = [int(m.group(1)) for k in at if (m := _UNIT_CALL.match(lines[k]))]
    return "\n".join(lines[: at[0]]), units, "\n".join(lines[at[-1] + 1 :])


def _blocked_source(tmodel: treelite.Model, main_c: str) -> str | None:
    """The cache-blocked batch entry point to append to ``main_c``, if it applies."""
    parts = _split_predict(main_c)
    if parts is None:
        return None
    prologue, units, epilogue = parts
    loops = "\n".join(
        f"  for (int i = 0; i < m; ++i) {{ predict_unit{u}(rows[i], res[i]); }}" for u in units
    )
    return render(
        BLOCKED_C,
        {
            "n_feature": int(tmodel.num_feature),
            "leaf_type": _C_TYPES[str(tmodel.output_type)],
            "block": TL2CGEN_BLOCK_ROWS,
            "prologue": prologue,
            "epilogue": epilogue,
            "unit_loops": loops,
            "batch_symbol": TL2CGEN_BATCH_SYMBOL,
            "nfeature_symbol": TL2CGEN_NFEATURE_SYMBOL,
            "noutput_symbol": TL2CGEN_NOUTPUT_SYMBOL,
        },
    )


def build_tl2cgen(source: Source, folder: Path, cache_dir: Path) -> Candidate:
    """Compile (or take from the cache) the forest's library into ``folder``."""
    tmodel = to_treelite(source)
    cached = cache_dir / "tl2cgen" / f"{compile_key(source.sha256)}.so"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _compile_tl2cgen(tmodel, cached)
    shutil.copyfile(cached, folder / TL2CGEN_LIB)
    return Candidate(
        name="tl2cgen",
        engine="tl2cgen",
        folder=folder,
        params={"lib": TL2CGEN_LIB, "threads": 1, **outputs_param(source)},
        local=True,
        container=None,
        notes=(
            f"tl2cgen {package_version('tl2cgen')} (quantized thresholds, {tmodel.input_type}) + "
            f"gcc -O3; one ctypes call per batch via {TL2CGEN_BATCH_SYMBOL}, tree units run "
            f"over blocks of up to {TL2CGEN_BLOCK_ROWS} rows"
        ),
    )
