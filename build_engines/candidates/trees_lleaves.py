"""The ``lleaves`` candidate (LightGBM only): the forest compiled to machine code by LLVM.

lleaves compiles the model to an object file, which is linked here into a
shared library so that serving needs neither LLVM nor a compile step. The
library is cached by the model's sha256 and the host CPU (the code is tuned to
it; the loader refuses other CPUs), because compiling 500 trees takes over a
minute.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from build_engines.base import Candidate, Source
from build_engines.candidates.compile_cache import (
    cache_key,
    package_version,
    publishing,
    run_tool,
)
from build_engines.candidates.trees_onnx import outputs_param
from setsuna.errors import SourceError
from setsuna.runtime.trees import cpu_flags, host_cpu

LLEAVES_MODEL = "model.txt"
#: lleaves' object file linked into a shared library (hyphenated for the reason
#: given at :data:`setsuna.runtime.trees.TL2CGEN_LIB`).
LLEAVES_LIB = "lleaves-forest.so"
LLEAVES_LINK = "gcc -shared -Wl,-Bsymbolic"
#: lleaves ``fblocksize``: trees run over the whole batch a block at a time.
#: 500x63 example, 1024 rows, threads=1: 8 -> 131k rows/s, 16 -> 123k, 34
#: (lleaves' default) -> 110k, 128 -> 92k, 1 -> 118k; single-row p50 the same
#: within noise (22-23 us). Compile time ~1 min either way.
LLEAVES_BLOCKSIZE = 8


def build_lleaves(source: Source, folder: Path, cache_dir: Path) -> Candidate:
    """Compile (or take from the cache) the forest's library into ``folder``."""
    import lleaves

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / LLEAVES_MODEL
        model_file.write_text(source.model.model_to_string())
        model = lleaves.Model(model_file=str(model_file))
        if model.num_model_per_iteration() != source.n_outputs:
            raise SourceError(
                f"{source.name}: lleaves compiled {model.num_model_per_iteration()} outputs per "
                f"row for a source scoring {source.n_outputs}; serve the onnx candidate"
            )
        n_features = int(model.num_feature())
        cpu, features = host_cpu()
        key = cache_key(
            source.sha256,
            "lleaves",
            package_version("lleaves"),
            package_version("llvmlite"),
            cpu,
            features,
            f"fblocksize={LLEAVES_BLOCKSIZE}",
            LLEAVES_LINK,
        )
        cached = cache_dir / "lleaves" / f"{key}.so"
        if not cached.is_file():
            obj = Path(tmp) / "forest.o"
            model.compile(cache=str(obj), fblocksize=LLEAVES_BLOCKSIZE)
            with publishing(cached) as out:
                # lleaves emits position-independent code (reloc "pic"); the only
                # outside symbol it calls is libm's exp (the sigmoid).
                run_tool([*LLEAVES_LINK.split(), "-o", str(out), str(obj), "-lm"], "link lleaves")
    shutil.copyfile(cached, folder / LLEAVES_LIB)
    return Candidate(
        name="lleaves",
        engine="lleaves",
        folder=folder,
        params={
            "lib": LLEAVES_LIB,
            "n_features": n_features,
            "threads": 1,
            "target_cpu": cpu,
            "cpu_flags_sha256": cpu_flags(),
            **outputs_param(source),
        },
        local=True,
        container=None,
        notes=(
            f"lleaves {package_version('lleaves')} / llvmlite {package_version('llvmlite')}, "
            f"float64, fblocksize {LLEAVES_BLOCKSIZE}, linked into {LLEAVES_LIB} (no LLVM at serve "
            f"time); machine code for CPU {cpu!r}: the loader refuses other CPUs"
        ),
    )
