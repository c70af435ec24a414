"""Publishing a model: written aside, verified, swapped in; a serving folder is never half-written.

Real builds (the logistic ONNX model through the real gate and repository
writer), real child processes killed for real (SIGKILL, or the kernel's
SIGXFSZ at a file-size limit, which lands at an exact byte of a copy), and
the real ``tritonserver`` on the repository a killed build left behind.
Children report where they are on a pipe; nothing here waits on a clock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from build_engines import gate
from build_engines.build import Evaluation, evaluate
from build_engines.repository import VERSION, write_model
from build_engines.spec import ModelSpec
from setsuna import manifest, publish
from setsuna.errors import ArtifactError
from setsuna.server import LocalTriton, ServerSettings, find_tritonserver, free_ports
from tests.helpers import build_logistic_models, logistic_candidate, logistic_source

ROOT = Path(__file__).resolve().parents[2]
N = 5
X = np.random.default_rng(11).normal(size=(600, N)).astype(np.float32)
W_OLD = np.linspace(-1.0, 1.0, N).astype(np.float32)
W_NEW = np.linspace(1.0, -1.0, N).astype(np.float32)
FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: the byte-for-byte picture of a model."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two complete published folders of model ``logit`` (different weights) to copy from."""
    root = tmp_path_factory.mktemp("sources")
    return {
        tag: build_logistic_models(root / tag, {"logit": w}, X) / "logit"
        for tag, w in (("old", W_OLD), ("new", W_NEW))
    }


@pytest.fixture
def live(tmp_path: Path, sources: dict[str, Path]) -> Iterator[Path]:
    """A repository serving ``logit`` (the "old" build), published the real way."""
    repo = tmp_path / "repo"
    src = sources["old"]
    publish.publish(repo, "logit", lambda f: _copy_model(src, f))
    yield repo


def _copy_model(src: Path, dst: Path) -> None:
    shutil.copy2(src / "config.pbtxt", dst / "config.pbtxt")
    shutil.copytree(src / str(VERSION), dst / str(VERSION))


# A publisher in its own process: copies a built model into the staging folder and,
# in "block" mode, stops half-way (one file of the version folder written) and says
# so on stdout, then waits for its stdin to close. Killing it there is a publish
# killed while writing the staging folder.
PUBLISHER = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from setsuna import manifest, publish

    repo, src, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def write(folder):
        shutil.copy2(src / "config.pbtxt", folder / "config.pbtxt")
        (folder / "1").mkdir()
        for i, f in enumerate(sorted((src / "1").iterdir())):
            shutil.copy2(f, folder / "1" / f.name)
            if mode == "block" and i == 0:
                print("staged", folder, flush=True)
                sys.stdin.read()

    publish.publish(
        repo,
        "logit",
        write,
        check=lambda f: manifest.verify(f / "1"),
        on_wait=lambda message: print("waiting", message, flush=True),
    )
    print("published", flush=True)
    """
)


def _publisher(repo: Path, src: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(repo), str(src), mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _said(proc: subprocess.Popen[str]) -> str:
    """The publisher's next line; its stderr if it died instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        assert proc.stderr is not None
        pytest.fail(f"publisher exited {proc.returncode}: {proc.stderr.read()}")
    return line.strip()


def test_sigkill_while_staging_leaves_the_live_model_and_a_server_starts(
    live: Path, sources: dict[str, Path]
) -> None:
    before = _files(live / "logit")
    proc = _publisher(live, sources["new"], "block")
    said = _said(proc)
    assert said.startswith("staged ")
    staged = Path(said.split(" ", 1)[1])
    assert staged.is_dir() and staged.parent.name.startswith(".")  # hidden box, real name
    proc.kill()  # SIGKILL: no handler, no cleanup runs
    assert proc.wait() == -signal.SIGKILL

    # The serving folder is the old one, byte for byte, and still verifies.
    assert _files(live / "logit") == before
    manifest.verify(live / "logit" / "1")
    # The half-written folder is a hidden leftover: not a model to the launcher.
    assert publish.leftovers(live, "logit") == [staged.parent]
    settings = ServerSettings(live, load_models=None, **_ports())
    assert settings.models == ("logit",)

    try:
        find_tritonserver()
    except Exception as exc:  # pragma: no cover - CI without the serve extra
        pytest.skip(f"no tritonserver: {exc}")
    import tritonclient.grpc as grpcclient

    with LocalTriton(settings, require_all_models=False) as server:
        assert server.running
        client = grpcclient.InferenceServerClient(server.grpc_url)
        index = client.get_model_repository_index(headers=server.grpc_admin_headers, as_json=True)[
            "models"
        ]
        # Triton lists every folder, hidden ones too; the leftover is never loaded.
        leftover = [m for m in index if m["name"] == staged.parent.name]
        assert all("state" not in m for m in leftover), index
        if (live / "logit" / "1" / "seal.json").is_file():  # serving needs a sealed folder
            assert server.unavailable == {}
            assert client.is_model_ready("logit")

    # The next publish removes the leftover and puts the new model in place.
    proc = _publisher(live, sources["new"], "go")
    assert _said(proc) == "published" and proc.wait() == 0
    assert publish.leftovers(live, "logit") == []
    assert _files(live / "logit") == _files(sources["new"])


def _ports() -> dict[str, int]:
    http, grpc, metrics = free_ports(3)
    return {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}


# The real build's writer in its own process, under a file-size limit smaller than one
# of the candidate's files: the kernel stops it at that byte of the copy, either
# killing it (SIGXFSZ, no cleanup runs) or failing the write (EFBIG, Python's default).
BUILD = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import numpy as np
    from build_engines import gate
    from build_engines.build import evaluate
    from build_engines.repository import write_model
    from build_engines.spec import ModelSpec
    from tests.helpers import logistic_candidate, logistic_source

    repo, work, how, limit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    w = np.linspace(1.0, -1.0, 5).astype(np.float32)
    x = np.random.default_rng(11).normal(size=(600, 5)).astype(np.float32)

    def convert(source, folder, calib):
        c = logistic_candidate(folder / "onnx", w, 0.0)
        (c.folder / "padding.bin").write_bytes(bytes(2 * limit))  # copied after model.onnx
        return [c]

    spec = ModelSpec("logit", gate=gate.GateSettings(latency_calls=20, batch_budget_s=0.01))
    source = logistic_source(w, 0.0)
    ev = evaluate(source, x, spec, ("local",), work, converter=convert)
    if how == "killed":
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    write_model(repo, spec, source, ev.chosen["local"], "local", ev.report)
    """
)


@pytest.mark.parametrize("how", ["killed", "failed"])
def test_a_build_stopped_mid_copy_leaves_the_live_model_intact(
    live: Path, tmp_path: Path, how: str
) -> None:
    before = _files(live / "logit")
    limit = 1 << 20
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(live), str(tmp_path / "work"), how, str(limit)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if how == "killed":
        assert done.returncode == -signal.SIGXFSZ, done.stderr
        # What the kernel stopped: the staging copy of padding.bin, cut at the limit.
        (box,) = publish.leftovers(live, "logit")
        assert (box / "logit" / "1" / "padding.bin").stat().st_size == limit
    else:
        assert done.returncode == 1 and "File too large" in done.stderr, done.stderr
        assert publish.leftovers(live, "logit") == []  # a failed publish cleans up
    assert _files(live / "logit") == before
    manifest.verify(live / "logit" / "1")
    assert ServerSettings(live, **_ports()).models == ("logit",)


def test_two_publishers_of_one_model_take_turns(live: Path, sources: dict[str, Path]) -> None:
    first = _publisher(live, sources["old"], "block")
    assert _said(first).startswith("staged ")
    second = _publisher(live, sources["new"], "go")
    said = _said(second)
    # The second waits for the lock, naming who holds it, before staging anything.
    assert said.startswith("waiting") and str(first.pid) in said, said
    assert len(publish.leftovers(live, "logit")) == 1  # only the first one's box
    assert first.stdin is not None
    first.stdin.close()  # let the first finish
    assert _said(first) == "published" and first.wait() == 0
    assert _said(second) == "published" and second.wait() == 0
    assert _files(live / "logit") == _files(sources["new"])  # the later publish won
    manifest.verify(live / "logit" / "1")
    assert publish.leftovers(live, "logit") == []


def test_a_publisher_that_cannot_get_the_lock_says_who_holds_it(
    live: Path, sources: dict[str, Path]
) -> None:
    before = _files(live / "logit")
    with (
        publish.model_lock(live, "logit"),
        pytest.raises(ArtifactError, match=rf"being published by process {os.getpid()}"),
    ):
        publish.publish(live, "logit", lambda f: _copy_model(sources["new"], f), lock_timeout_s=0)
    assert _files(live / "logit") == before


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    work = tmp_path_factory.mktemp("work")
    return evaluate(
        logistic_source(W_NEW, 0.0),
        X,
        ModelSpec("logit", gate=FAST),
        ("local",),
        work,
        converter=lambda s, d, c: [logistic_candidate(d / "onnx", W_NEW, 0.0)],
    )


def test_the_build_swaps_the_whole_folder_in_and_it_is_never_missing(
    tmp_path: Path, evaluation: Evaluation
) -> None:
    repo = tmp_path / "local"
    spec = ModelSpec("logit", gate=FAST)
    source, chosen = logistic_source(W_NEW, 0.0), evaluation.chosen["local"]
    assert chosen is not None
    model = repo / "logit"
    write_model(repo, spec, source, chosen, "local", evaluation.report)
    stop = threading.Event()
    seen = {"polls": 0, "missing": 0}

    def watch() -> None:
        while not stop.is_set():
            seen["polls"] += 1
            whole = (model / "config.pbtxt").is_file() and (model / "1" / "manifest.json").is_file()
            seen["missing"] += not whole

    watcher = threading.Thread(target=watch)
    watcher.start()
    replaced = []
    try:
        for _ in range(12):
            before = model.stat().st_ino
            version = write_model(repo, spec, source, chosen, "local", evaluation.report)
            assert version == model / "1"
            replaced.append(model.stat().st_ino != before)
    finally:
        stop.set()
        watcher.join()
    # Each publish put a new folder in place (the live one was never rewritten) ...
    assert all(replaced)
    # ... and at no poll was the model folder missing or half there.
    assert seen["polls"] > 0 and seen["missing"] == 0
    manifest.verify(model / "1")
    assert sorted(p.name for p in repo.iterdir()) == [".publish.logit.lock", "logit"]


def test_a_publish_whose_check_or_write_fails_changes_nothing(
    live: Path, sources: dict[str, Path]
) -> None:
    before = _files(live / "logit")

    def refuse(folder: Path) -> None:
        raise ArtifactError(f"{folder}: refused")

    with pytest.raises(ArtifactError, match="refused"):
        publish.publish(live, "logit", lambda f: _copy_model(sources["new"], f), check=refuse)
    with pytest.raises(ArtifactError, match="refused"):
        publish.publish(live, "logit", refuse)
    assert _files(live / "logit") == before
    assert publish.leftovers(live, "logit") == []


def test_a_first_publish_renames_in_and_names_are_checked(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    repo = tmp_path / "fresh"
    out = publish.publish(repo, "logit", lambda f: _copy_model(sources["old"], f))
    assert out == repo / "logit" and _files(out) == _files(sources["old"])
    for bad in ("", ".hidden", "a/b", "..", "-x"):
        with pytest.raises(ArtifactError, match="model folder name"):
            publish.publish(repo, bad, lambda f: None)


def test_leftovers_belong_to_exactly_one_model(tmp_path: Path) -> None:
    mine = tmp_path / ".publish.a.0123456789abcdef"
    other = tmp_path / ".publish.a.b.0123456789abcdef"
    for p in (mine, other, tmp_path / ".publish.a.notatoken", tmp_path / "a"):
        p.mkdir()
    (tmp_path / ".publish.a.lock").touch()
    assert publish.leftovers(tmp_path, "a") == [mine]
    assert publish.leftovers(tmp_path, "a.b") == [other]


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    publish.exchange(a, b)
    assert (b / "x").read_text() == "from a" and (a / "y").read_text() == "from b"
    with pytest.raises(FileNotFoundError):
        publish.exchange(a, tmp_path / "missing")
