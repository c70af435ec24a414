"""Probes of what lands on disk: tampered folders, an interrupted publish, a damaged source.

Tampered models are written into the shared server's repository and loaded
through the admin API, as an operator's publish would be; each carries code
that writes a sentinel file if it runs at all, so "refused" means refused
before a line of it executed.
"""

from __future__ import annotations

import functools
import json
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reliability import models, procs
from reliability.harness import Lab, Outcome, Shared, probe
from reliability.report import Probe, gist
from setsuna import manifest, publish, runtime, seal
from setsuna.errors import EngineError, TamperedArtifactError
from setsuna.server import LocalTriton

N: Final = 5
W_OLD: Final = np.linspace(-1.0, 1.0, N).astype(np.float32)
W_NEW: Final = np.linspace(1.0, -1.0, N).astype(np.float32)


def run_served(lab: Lab, main: Shared[LocalTriton]) -> list[Probe]:
    """Probe 6: every way of changing a published folder is refused at load."""
    return [
        probe(
            "6a",
            "tamper: planted __pycache__/model.<tag>.pyc",
            "load refused naming the .pyc; its code never runs",
            lambda: _planted_pyc(lab, main.get()),
        ),
        probe(
            "6b",
            "tamper: planted model.<abi>.so",
            "load refused naming the .so; its constructor never runs",
            lambda: _planted_so(lab, main.get()),
        ),
        probe(
            "6c",
            "tamper: artifact edited, manifest re-hashed",
            "manifest alone verifies (the attacker's re-hash); the seal does not; load refused",
            lambda: _rehashed(lab, main.get()),
        ),
        probe(
            "6d",
            "tamper: absolute path in engine_params",
            "setsuna.runtime.load refuses it (tl2cgen lib, onnx file, '..'); the library "
            "never loads",
            lambda: _absolute_engine_path(lab),
        ),
        probe(
            "6e",
            "tamper: config.pbtxt edited",
            "load refused naming config.pbtxt; the (sealed) model code never runs",
            lambda: _edited_config(lab, main.get()),
        ),
    ]


def run(lab: Lab) -> list[Probe]:
    return [
        probe(
            "8",
            "publish killed (-9) while staging",
            "live folder byte-identical and verifying; a server on the repo loads the model, "
            "never the leftover; recovery time n/a",
            lambda: _interrupted_publish(lab),
        ),
        *_corrupt_lightgbm(lab),
    ]


# -- 6: tampering --------------------------------------------------------------------------


def _load(srv: LocalTriton, name: str) -> tuple[bool, str, bool]:
    """(loaded, Triton's message, ready afterwards) for an admin-API load of ``name``."""
    with grpcclient.InferenceServerClient(srv.grpc_url) as c:
        try:
            c.load_model(name, headers=srv.grpc_admin_headers)
            loaded, why = True, "loaded"
        except InferenceServerException as exc:
            loaded, why = False, str(exc)
        return loaded, why, bool(c.is_model_ready(name))


def _verdict(loaded: bool, why: str, ready: bool, needle: str, sentinel: Path | None) -> Outcome:
    ran = sentinel is not None and sentinel.exists()
    named = needle in why
    said = "ACCEPTED" if loaded else f"refused ({gist(why)})"
    tail = "" if sentinel is None else f"; sentinel {'WRITTEN' if ran else 'absent'}"
    return Outcome(
        f"load {said}; says {needle!r}: {named}; ready: {ready}{tail}",
        not loaded and not ready and named and not ran,
        {"code_ran": ran},
    )


def _repo(srv: LocalTriton) -> Path:
    return srv.settings.model_repository


def _planted_pyc(lab: Lab, srv: LocalTriton) -> Outcome:
    sentinel = lab.root / "pyc-ran"
    model_dir = models.python_model(_repo(srv), "t_pyc")
    cache = model_dir / "1" / "__pycache__"
    cache.mkdir()
    evil = lab.path("scratch") / "evil.py"
    evil.write_text(models.EVIL_PY.format(sentinel=str(sentinel)))
    planted = cache / f"model.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(evil), cfile=str(planted), doraise=True)
    return _verdict(*_load(srv, "t_pyc"), planted.name, sentinel)


def _planted_so(lab: Lab, srv: LocalTriton) -> Outcome:
    sentinel = lab.root / "so-ran"
    model_dir = models.python_model(_repo(srv), "t_so")
    suffix = str(sysconfig.get_config_var("EXT_SUFFIX"))
    planted = models.planted_library(model_dir / "1" / f"model{suffix}", sentinel)
    return _verdict(*_load(srv, "t_so"), planted.name, sentinel)


def _rehashed(lab: Lab, srv: LocalTriton) -> Outcome:
    built = models.logistic_models(lab.path("tamper"), {"t_rehash": W_OLD})
    target = _repo(srv) / "t_rehash"
    shutil.copytree(built / "t_rehash", target)
    version = target / "1"
    # The attacker swaps the engine for one with other weights and re-hashes the manifest.
    models.logistic_onnx(version / "model.onnx", W_NEW)
    doc = json.loads((version / manifest.MANIFEST_NAME).read_text())
    doc["files"]["model.onnx"] = manifest.sha256_file(version / "model.onnx")
    (version / manifest.MANIFEST_NAME).write_text(json.dumps(doc))
    manifest.verify(version)  # the re-hash satisfies the manifest alone
    try:
        seal.verify_version(version)
        sealed = "seal ACCEPTS it"
    except TamperedArtifactError as exc:
        sealed = "the seal refuses it" if "does not match the seal" in str(exc) else str(exc)
    out = _verdict(*_load(srv, "t_rehash"), "does not match the seal", None)
    out.observed = f"manifest.verify passes; {sealed}; {out.observed}"
    out.ok = out.ok and sealed == "the seal refuses it"
    return out


def _absolute_engine_path(lab: Lab) -> Outcome:
    sentinel = lab.root / "engine-lib-ran"
    lib = models.planted_library(lab.path("outside") / "forest.so", sentinel)
    onnx_file = models.logistic_onnx(lab.path("outside") / "model.onnx", W_OLD)
    version = lab.path("engine-path", "1")
    shutil.copy(onnx_file, version / "model.onnx")
    attempts = {
        "tl2cgen lib=<absolute .so>": ("tl2cgen", {"lib": str(lib)}),
        "onnx file=<absolute>": ("onnxruntime", {"file": str(onnx_file)}),
        "onnx file=../outside/model.onnx": ("onnxruntime", {"file": "../../outside/model.onnx"}),
    }
    refused = []
    for label, (kind, params) in attempts.items():
        try:
            runtime.load(kind, version, params)
        except EngineError as exc:
            if "not a plain file name" in str(exc):
                refused.append(label)
    ran = sentinel.exists()
    return Outcome(
        f"{len(refused)}/{len(attempts)} refused ('not a plain file name inside the version "
        f"folder'); sentinel {'WRITTEN' if ran else 'absent'}",
        len(refused) == len(attempts) and not ran,
        {"code_ran": ran},
    )


def _edited_config(lab: Lab, srv: LocalTriton) -> Outcome:
    sentinel = lab.root / "config-ran"
    model_dir = models.python_model(
        _repo(srv), "t_config", models.EVIL_PY.format(sentinel=str(sentinel))
    )
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 4096"))
    return _verdict(*_load(srv, "t_config"), "config.pbtxt", sentinel)


# -- 8: a publish killed mid-way -----------------------------------------------------------

# Copies a built model into the staging folder, stops after the first file of the
# version folder, says so on stdout, and waits on stdin: killed there, it is a
# publish killed while writing the staging folder.
_PUBLISHER: Final = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from setsuna import manifest, publish

    repo, src = Path(sys.argv[1]), Path(sys.argv[2])

    def write(folder):
        shutil.copy2(src / "config.pbtxt", folder / "config.pbtxt")
        (folder / "1").mkdir()
        for i, f in enumerate(sorted((src / "1").iterdir())):
            shutil.copy2(f, folder / "1" / f.name)
            if i == 0:
                print("staged", folder, flush=True)
                sys.stdin.read()

    publish.publish(repo, "logit", write, check=lambda f: manifest.verify(f / "1"))
    print("published", flush=True)
    """
)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _copy_model(src: Path, dst: Path) -> None:
    shutil.copy2(src / "config.pbtxt", dst / "config.pbtxt")
    shutil.copytree(src / "1", dst / "1")


def _interrupted_publish(lab: Lab) -> Outcome:
    old = models.logistic_models(lab.path("publish", "old"), {"logit": W_OLD}) / "logit"
    new = models.logistic_models(lab.path("publish", "new"), {"logit": W_NEW}) / "logit"
    live = lab.path("publish", "repo")
    publish.publish(live, "logit", lambda f: _copy_model(old, f))
    before = _files(live / "logit")
    proc = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(live), str(new)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    said = proc.stdout.readline().strip()
    proc.kill()  # SIGKILL: no handler, no cleanup
    rc = proc.wait()
    proc.communicate()
    if not said.startswith("staged "):
        return Outcome(f"the publisher never staged (said {said!r}, exit {rc})", False)
    box = Path(said.split(" ", 1)[1]).parent
    intact = _files(live / "logit") == before
    manifest.verify(live / "logit" / "1")
    seal.verify_version(live / "logit" / "1")
    left = publish.leftovers(live, "logit")
    with LocalTriton(
        procs.settings(live), log_path=lab.root / "publish" / "triton.log", watchdog=False
    ) as srv:
        with grpcclient.InferenceServerClient(srv.grpc_url) as c:
            index = c.get_model_repository_index(headers=srv.grpc_admin_headers, as_json=True)
            listed = [m for m in index.get("models", []) if m["name"] == box.name]
            loaded_box = any("state" in m for m in listed)
            ready = bool(c.is_model_ready("logit"))
        x = np.ones((1, N), np.float32)
        score = procs.infer(srv.grpc_url, "logit", x).as_numpy("score")
        old_answers = bool(np.allclose(score, models.oracle(W_OLD, x), atol=1e-6))
        models_loaded = srv.settings.models
    ok = (
        rc == -signal.SIGKILL
        and intact
        and left == [box]
        and models_loaded == ("logit",)
        and not loaded_box
        and ready
        and old_answers
    )
    return Outcome(
        f"killed ({'SIGKILL' if rc == -signal.SIGKILL else rc}) mid-copy; live folder "
        f"{'byte-identical' if intact else 'CHANGED'}, manifest+seal verify; leftover "
        f"{[p.name for p in left]}; server loads {list(models_loaded)}, Triton lists the "
        f"leftover {len(listed)}x {'LOADED' if loaded_box else 'without a state'}; logit "
        f"ready: {ready}, answers with the old weights: {old_answers}",
        ok,
        {"recovery_s": None},
    )


# -- 13: a damaged LightGBM file -----------------------------------------------------------


def _corrupt_lightgbm(lab: Lab) -> list[Probe]:
    damages: dict[str, Callable[[str], str]] = {
        "truncated mid-tree": lambda t: t[: t.index("Tree=3") + 60],
        # count right, offsets wrong: LightGBM's own parser aborts (SIGABRT) on this one
        "tree sizes off": lambda t: re.sub(
            r"^tree_sizes=(.*)$",
            lambda m: "tree_sizes=" + " ".join(str(int(v) + 7) for v in m.group(1).split()),
            t,
            count=1,
            flags=re.M,
        ),
    }
    return [
        probe(
            f"13{letter}",
            f"LightGBM file {damage}",
            "python -m build_engines exits 2, last line 'error: <file> ... save the model "
            "again'; nothing published",
            functools.partial(_build_damaged, lab, damage, edit),
        )
        for letter, (damage, edit) in zip("ab", damages.items(), strict=True)
    ]


def _lightgbm_text(lab: Lab) -> tuple[str, Path]:
    cached = lab.root / "lgbm" / "m.txt"
    rows = lab.root / "lgbm" / "rows.npy"
    if not cached.exists():
        import lightgbm as lgb

        rng = np.random.default_rng(5)
        x = rng.normal(size=(1200, 6)).astype(np.float32)
        y = (x[:, 0] - x[:, 1] > 0).astype(np.int8)
        params = {"objective": "binary", "num_leaves": 5, "verbose": -1, "num_threads": 1}
        lab.path("lgbm")
        booster = lgb.train(params, lgb.Dataset(x[:800], y[:800]), num_boost_round=8)
        booster.save_model(str(cached))
        np.save(rows, x[800:])
    return cached.read_text(), rows


def _build_damaged(lab: Lab, damage: str, edit: Callable[[str], str]) -> Outcome:
    text, rows = _lightgbm_text(lab)
    work = lab.path("lgbm", damage.replace(" ", "_"))
    bad = work / "bad.txt"
    bad.write_text(edit(text))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "build_engines",
            "--model",
            str(bad),
            "--name",
            "x",
            "--valid-rows",
            str(rows),
            "--target",
            "local",
            "--out",
            str(work / "repo"),
            "--workdir",
            str(work / "work"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    last = (done.stderr.strip().splitlines() or [""])[-1]
    named = last.startswith("error: ") and str(bad) in last and "save the model again" in last
    published = (work / "repo").exists()
    return Outcome(
        f"exit {done.returncode}; {gist(last.replace(str(work) + '/', ''))}; "
        f"published: {published}",
        done.returncode == 2 and named and not published,
        {"exit_status": done.returncode},
    )
