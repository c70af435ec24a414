"""The ensembles' bounds without a server: names, loops, key sizes, limits, shared last copy."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensembles import cycles, experiment, keys, members, names, selection, signal
from ensembles import repository as rep
from ensembles.limits import Limits, Overdue, call_timeout
from ensembles.watch import Poller, Watched, shared_copy
from setsuna import contract
from setsuna.contract import Target
from setsuna.errors import ConfigError, InputError

EXP: dict[str, Any] = {
    "format": 1,
    "name": "t",
    "salt": "s",
    "arms": {"a": {"model": "alpha", "version": 1}, "b": {"model": "beta", "version": 1}},
    "versions": [{"version": 1, "weights": {"a": 0.5, "b": 0.5}}],
}


def _exp(*weights: dict[str, float], **arms: str) -> dict[str, Any]:
    doc = copy.deepcopy(EXP)
    for arm, model in arms.items():
        doc["arms"][arm] = {"model": model, "version": 1}
    if weights:
        doc["versions"] = [{"version": i + 1, "weights": w} for i, w in enumerate(weights)]
    return doc


# -- names ---------------------------------------------------------------------------

BAD_NAMES = ["..", ".", "a/b", "../alpha", "", "Bad Name", "x" * 256, "\u03b1", 7, None]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_every_file_refuses_a_name_triton_would_not_take(bad: object) -> None:
    with pytest.raises(ConfigError, match="not a Triton model name"):
        experiment.parse(_exp(c=bad))  # type: ignore[arg-type]
    doc = copy.deepcopy(EXP)
    doc["shadow"] = {"model": bad, "version": 1}
    with pytest.raises(ConfigError, match=r"shadow: model .* not a Triton model name"):
        experiment.parse(doc)
    member = {"format": 1, "members": [{"model": "alpha", "version": 1, "weight": 1}] * 1}
    member["members"] = [*member["members"], {"model": bad, "version": 1, "weight": 1}]
    with pytest.raises(ConfigError, match=r"members\[1\].*not a Triton model name"):
        members.parse(member)
    variants = [{"model": "alpha", "version": 1, "prior_accuracy": 0.9}]
    variants.append({"model": bad, "version": 1, "prior_accuracy": 0.9})
    sel = {"format": 1, "family": "f", "budget_p99_ms": 1.0, "variants": variants}
    with pytest.raises(ConfigError, match=r"variants\[1\].*not a Triton model name"):
        selection.parse(sel)


def test_names_triton_takes_pass() -> None:
    for good in ("a", "a.b-c_1", "x" * 255, "..a", "1"):
        assert contract.model_name(good, "t") == good


def test_a_path_may_not_leave_the_repository(tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    (repo / "alpha" / "1").mkdir(parents=True)
    (outside / "1").mkdir(parents=True)
    assert names.inside(repo, "alpha", "1") == (repo / "alpha" / "1").resolve()
    (repo / "linked").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the model repository"):
        names.inside(repo, "linked", "1")
    with pytest.raises(ConfigError, match="outside the model repository"):
        names.inside(repo, "..", "outside", "1")


# -- loops ---------------------------------------------------------------------------

ENGINE_CONFIG = 'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
ENGINE_PY = "from setsuna.backend import TritonPythonModel\n"


def _model(repo: Path, name: str, config: str, code: str | None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config.replace("{name}", name))
    if code is not None:
        (repo / name / "1" / "model.py").write_text(code)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Engines alpha and beta, a router over them, the decision ensemble, odd others."""
    repo = tmp_path / "repo"
    for name in ("alpha", "beta"):
        _model(repo, name, ENGINE_CONFIG, ENGINE_PY)
    _model(repo, "onnx", 'name: "{name}"\nplatform: "onnxruntime_onnx"\n', None)
    _model(repo, "handmade", ENGINE_CONFIG, "import numpy\nclass TritonPythonModel: ...\n")
    leaf = ENGINE_CONFIG + 'parameters { key: "leaf" value { string_value: "true" } }\n'
    _model(repo, "declared", leaf, "class TritonPythonModel: ...\n")
    _model(repo, "garbled", "name: {name\n", None)
    (tmp_path / "exp.json").write_text(json.dumps(EXP))
    rep.write_router(repo, tmp_path / "exp.json", 4)
    rep.write_signal(repo, {1: signal.Thresholds()})
    rep.write_decision(repo, 4)
    return repo


@pytest.mark.parametrize(
    ("callee", "why"),
    [
        ("router", "is this model itself"),  # router -> router
        ("decision", "is a Triton ensemble"),  # router -> decision -> router
        ("signal", "is an ensembles signal model"),
        ("handmade", "is a hand-written Python model that may call other models"),
        ("nowhere", "is not in the model repository"),
        ("garbled", "has a config.pbtxt that does not parse"),
    ],
)
def test_a_router_may_call_engines_only(repo: Path, callee: str, why: str) -> None:
    exp = experiment.parse(_exp(c=callee))
    with pytest.raises(ConfigError, match=f"arm 'c' {callee}:1 {why}.*point it at an engine"):
        cycles.check(repo, "router", experiment.callees(exp), "exp.json")


def test_another_router_is_refused_as_well(repo: Path, tmp_path: Path) -> None:
    rep.write_router(repo, tmp_path / "exp.json", 4, name="router2")
    why = cycles.refusal(repo, "router", Target("router2", 1))
    assert why is not None and "ensembles router model" in why


@pytest.mark.parametrize("callee", ["alpha", "onnx", "declared"])
def test_engines_and_declared_leaves_may_be_called(repo: Path, callee: str) -> None:
    assert cycles.refusal(repo, "router", Target(callee, 1)) is None


def test_a_missing_version_and_a_shadow_are_checked_too(repo: Path) -> None:
    assert "no version folder" in str(cycles.refusal(repo, "router", Target("alpha", 2)))
    doc = _exp()
    doc["shadow"] = {"model": "decision", "version": 1}
    with pytest.raises(ConfigError, match="shadow decision:1 is a Triton ensemble"):
        cycles.check(repo, "router", experiment.callees(experiment.parse(doc)), "exp.json")


def test_writing_a_router_over_a_loop_is_refused_at_build_time(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "loop.json").write_text(json.dumps(_exp(c="decision")))
    with pytest.raises(ConfigError, match="decision:1 is a Triton ensemble"):
        rep.write_router(repo, tmp_path / "loop.json", 4, name="router3")
    assert not (repo / "router3").exists()


# -- keys ----------------------------------------------------------------------------


def test_a_key_longer_than_the_limit_is_refused_naming_it() -> None:
    keys.check_lengths([b"a" * 256, b"b"], 256, "input 'key'")
    with pytest.raises(InputError, match=r"input 'key': row 1 is 257 bytes.*max_key_bytes=256"):
        keys.check_lengths([b"a", b"b" * 257], 256, "input 'key'")


def test_the_key_memo_never_holds_more_bytes_than_its_cap() -> None:
    cap = 64 << 10
    cache = keys.KeyCache(cap)
    e = experiment.parse(EXP)
    rng = np.random.default_rng(0)
    for batch in range(200):
        big = [rng.bytes(int(n)) for n in rng.integers(1, 257, size=64)]
        want = e.assign(big)
        np.testing.assert_array_equal(e.assign(big, cache), want)  # same arms as no memo
        assert cache.bytes <= cap and cache.peak <= cap, batch
    assert cache.clears > 10 and cache.peak > cap // 2
    hot = [b"acct-1", b"acct-2"]
    e.assign(hot, cache)
    assert cache.get(b"acct-1") is not None  # remembered after a flood
    other = experiment.parse(_exp({"a": 1.0}))
    e2 = other.assign(hot, cache)  # another experiment: nothing of the old one survives
    assert e2.tolist() == [0, 0] and len(cache) == 2


def test_a_memo_of_zero_bytes_remembers_nothing() -> None:
    cache = keys.KeyCache(0)
    experiment.parse(EXP).assign([b"k"], cache)
    assert len(cache) == 0 and cache.bytes == 0


# -- limits --------------------------------------------------------------------------


def test_limits_come_from_config_parameters_and_say_what_is_wrong() -> None:
    lim = Limits.from_parameters({"max_key_bytes": "64", "bls_timeout_ms": "250"}, "router")
    assert (lim.max_key_bytes, lim.bls_timeout_ms, lim.max_key_cache_bytes) == (64, 250.0, 16 << 20)
    assert Limits.from_parameters(lim.parameters(), "router") == lim
    with pytest.raises(ConfigError, match="router: config parameter max_key_bytes='1k'"):
        Limits.from_parameters({"max_key_bytes": "1k"}, "router")
    with pytest.raises(ConfigError, match=r"bls_timeout_ms=0\.0: give milliseconds"):
        Limits.from_parameters({"bls_timeout_ms": "0"}, "router")


def test_a_call_waits_the_requests_timeout_else_the_setting() -> None:
    assert call_timeout([0, 0], 1000.0) == (1.0, "bls_timeout_ms")
    assert call_timeout([0, 300_000, 700_000], 1000.0) == (0.3, "the request's timeout")
    assert call_timeout([5_000_000], 1000.0) == (5.0, "the request's timeout")


def test_overdue_calls_are_counted_per_model_until_they_return() -> None:
    o = Overdue(2)
    o.add("a:1")
    assert not o.full("a:1")
    o.add("a:1")
    assert o.full("a:1") and not o.full("b:1")
    o.done("a:1")
    assert o.count("a:1") == 1


# -- watching: one version for every instance ----------------------------------------


def _write(path: Path, doc: dict[str, Any] | str, mtime_ns: int) -> None:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.utime(path, ns=(mtime_ns, mtime_ns))


V1 = _exp({"a": 0.5, "b": 0.5})
V2 = _exp({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1})
V3 = _exp({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8})
S = 1_000_000_000


def _instances(path: Path, n: int = 2) -> list[Watched[experiment.Experiment]]:
    shared = shared_copy(path, "router")
    return [Watched(path, experiment.loads, shared=shared) for _ in range(n)]


def test_a_bad_file_leaves_every_instance_on_the_newest_valid_one(tmp_path: Path) -> None:
    """The issue: one instance read v2, the other only saw the bad file after it."""
    f = tmp_path / "experiment.json"
    _write(f, V1, 1 * S)
    a, b = _instances(f)
    _write(f, V2, 2 * S)
    a.poll()  # only a sees v2
    _write(f, "{bad", 3 * S)
    refused, adopted = b.poll()
    assert (
        "not JSON" in refused.refused and adopted.took_effect and "newer valid copy" in adopted.note
    )
    assert [c.took_effect for c in a.poll()] == [False]
    assert a.current.version == b.current.version == 2  # b took the copy a wrote
    assert b.failures == 1 and a.failures == 1


def test_an_older_validation_never_replaces_a_newer_copy(tmp_path: Path) -> None:
    f = tmp_path / "experiment.json"
    _write(f, V1, 1 * S)
    a, b, c = _instances(f, 3)
    _write(f, V3, 3 * S)
    a.poll()  # publishes v3 (from the file of time 3)
    shared = shared_copy(f, "router")
    _write(f, V2, 2 * S)  # a file with an older time (restored with cp -p)
    b.poll()  # serves it while it is valid, but may not replace the newer copy
    assert b.current.version == 2 and experiment.load(shared).version == 3
    _write(f, "{bad", 4 * S)
    for w in (a, b, c):
        w.poll()
    assert {w.current.version for w in (a, b, c)} == {3}


def test_a_valid_file_after_a_bad_one_takes_effect_everywhere(tmp_path: Path) -> None:
    f = tmp_path / "experiment.json"
    _write(f, V1, 1 * S)
    a, b = _instances(f)
    _write(f, "{bad", 2 * S)
    a.poll(), b.poll()
    _write(f, V2, 3 * S)
    assert [c.took_effect for c in a.poll()] == [True] and b.poll()[0].took_effect
    assert a.current.version == b.current.version == 2


def test_without_a_writable_folder_it_says_instances_may_disagree(tmp_path: Path) -> None:
    f = tmp_path / "experiment.json"
    _write(f, V1, 1 * S)
    w = Watched(f, experiment.loads, shared=tmp_path / "missing" / "copy")
    (note,) = w.poll()
    assert "may disagree" in note.note and w.current.version == 1


def test_the_poller_calls_until_stopped_and_survives_errors() -> None:
    calls: list[int] = []
    errors: list[BaseException] = []
    twice = threading.Event()

    def fn() -> None:
        calls.append(1)
        if len(calls) >= 3:
            twice.set()
        raise RuntimeError("one bad poll")

    p = Poller(fn, 0.001, errors.append)
    assert twice.wait(30)
    p.stop()
    n = len(calls)
    assert errors and all(str(e) == "one bad poll" for e in errors)
    assert len(calls) == n  # stopped
