"""Probes of the running server: the admin key, HTTP, requests it must refuse, its config check.

One server (``start_main``) serves these and the probes of
:mod:`reliability.artifacts` and :mod:`reliability.recovery` that need a
live server: echo models, a 48-feature echo (``wide``), a logistic engine
(``logit``, served by setsuna's backend) and a ``garbled`` model whose
config does not parse.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import grpc  # type: ignore[import-untyped]
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as pb
import tritonclient.grpc.service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from build_engines.spec import ServingSpec
from reliability import models, procs
from reliability.harness import Lab, Outcome, Shared, probe
from reliability.report import Probe, gist
from setsuna.errors import ConfigError
from setsuna.server import ADMIN_TOKEN_ENV, TOKEN_PLACEHOLDER, LocalTriton, ServerSettings

NOBODY: Final = 65534
LOGIT_W: Final = np.linspace(-1.0, 1.0, 5).astype(np.float32)
WIDE: Final = 48


def start_main(lab: Lab) -> LocalTriton:
    """The shared server: every model folder loaded, the garbled one named and skipped."""
    repo = lab.path("main", "repo")
    for name in ("echo", "victim"):
        models.python_model(repo, name)
    models.python_model(repo, "wide", n=WIDE)
    built = models.logistic_models(lab.path("main", "built"), {"logit": LOGIT_W}, ServingSpec())
    (built / "logit").rename(repo / "logit")
    models.python_model(repo, "garbled")
    (repo / "garbled" / "config.pbtxt").write_text('name: "garbled"\nbackend: "python"\n}}{{\n')
    server = LocalTriton(
        procs.settings(repo), log_path=lab.root / "main" / "triton.log", require_all_models=False
    )
    return server.start()


def run(lab: Lab, main: Shared[LocalTriton]) -> list[Probe]:
    return [
        probe(
            "1a",
            "admin key not in /proc/<pid>/cmdline",
            "read by another user (uid 65534): the placeholder, never the key",
            lambda: _cmdline(lab, main.get()),
        ),
        probe(
            "1b",
            "/proc/<pid>/environ unreadable by others",
            "another user's read of the server's environ is refused",
            lambda: _environ_private(main.get()),
        ),
        probe(
            "1c",
            "admin key in no environment",
            f"neither the key nor ${ADMIN_TOKEN_ENV} in the environ of the server or any stub",
            lambda: _environ_clean(lab, main.get()),
        ),
        probe(
            "2",
            "repository API file: override (with the key)",
            "load refused; the override's code never runs (no sentinel); others still serve",
            lambda: _file_override(lab, main.get()),
        ),
        probe(
            "3a",
            "HTTP off by default",
            "the HTTP port refuses connections",
            lambda: _http_off(main.get()),
        ),
        probe(
            "3b",
            "gRPC request declaring shape [1000000000, 48]",
            "refused with a status (not a dropped connection); server alive and serving",
            lambda: _grpc_hostile(main.get(), [1_000_000_000, WIDE], b"\0" * (WIDE * 4)),
            note="HTTP in 2.51 aborts on this (bad_alloc): why HTTP is off",
        ),
        probe(
            "3c",
            "gRPC request of ~80 MiB",
            "refused with a status (not a dropped connection); server alive and serving",
            lambda: _grpc_hostile(main.get(), [436_907, WIDE], bytes(436_907 * WIDE * 4)),
            note="HTTP in 2.51 segfaults on a body this size",
        ),
        probe(
            "14",
            "garbled config.pbtxt",
            "LocalTriton names the file and line in `unavailable`, never hands it to "
            "Triton; the other models serve",
            lambda: _garbled(main.get()),
        ),
        *_bad_requests(main),
        probe(
            "15d",
            "unknown model",
            "refused (NOT_FOUND / unknown model); server alive",
            lambda: _unknown_model(main.get()),
        ),
        probe(
            "15e",
            "admin calls without the key",
            "repository index/load/unload, log settings, shared memory: each refused "
            "('restricted'); logit still ready",
            lambda: _unauthenticated(main.get()),
        ),
        probe(
            "15f",
            "bind address loopback only",
            "gRPC and metrics listen on 127.0.0.1 only; a 0.0.0.0 bind is refused by settings",
            lambda: _loopback(main.get()),
        ),
        probe(
            "15g",
            "overload burst: 256 concurrent gRPC for 3 s",
            "no crash: server alive and answering afterwards; requests ok/failed counted",
            lambda: _burst(main.get()),
        ),
    ]


# -- 1: the admin key --------------------------------------------------------------------


def _as_other_user(path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["cat", path],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        cwd="/",
        check=False,
    )


def _cmdline(lab: Lab, srv: LocalTriton) -> Outcome:
    path = f"/proc/{srv.pid}/cmdline"
    if os.geteuid() == 0:
        done = _as_other_user(path)
        if done.returncode != 0:
            return Outcome(f"uid {NOBODY} could not read {path}: {done.stderr!r}", False)
        data, who = done.stdout, f"uid {NOBODY}"
    else:
        data, who = Path(path).read_bytes(), "this user (not root: no other user to act as)"
    key, placeholder = lab.token.encode() in data, TOKEN_PLACEHOLDER.encode() in data
    return Outcome(
        f"read as {who}: placeholder {'present' if placeholder else 'ABSENT'}, "
        f"key {'PRESENT' if key else 'absent'}",
        placeholder and not key,
        {"key_on_cmdline": key},
    )


def _environ_private(srv: LocalTriton) -> Outcome:
    path = f"/proc/{srv.pid}/environ"
    if os.geteuid() == 0:
        done = _as_other_user(path)
        refused = done.returncode != 0 and b"Permission denied" in done.stderr
        said = done.stderr.decode(errors="replace").strip() or f"read {len(done.stdout)} bytes"
        return Outcome(f"cat as uid {NOBODY}: {said}", refused)
    st = Path(path).stat()
    private = st.st_mode & 0o044 == 0
    return Outcome(
        f"mode {st.st_mode & 0o777:o} owner uid {st.st_uid} (not root: checked by mode)", private
    )


def _environ_clean(lab: Lab, srv: LocalTriton) -> Outcome:
    assert srv.pid is not None
    pids = procs.descendants(srv.pid)
    leaks = []
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        if lab.token.encode() in environ or ADMIN_TOKEN_ENV.encode() in environ:
            leaks.append(pid)
    stubs = len(pids) - 1
    return Outcome(
        f"server + {stubs} stubs checked; key found in {len(leaks)} ({leaks or 'none'})",
        stubs > 0 and not leaks,
        {"processes_checked": len(pids), "processes_with_key": len(leaks)},
    )


# -- 2: file: overrides ------------------------------------------------------------------


def _file_override(lab: Lab, srv: LocalTriton) -> Outcome:
    sentinel = lab.root / "override-ran"
    config = {
        "name": "override",
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    evil = models.EVIL_PY.format(sentinel=str(sentinel)).encode()
    with grpcclient.InferenceServerClient(srv.grpc_url) as c:
        try:
            c.load_model(
                "override",
                config=json.dumps(config),
                files={"file:1/model.py": evil},
                headers=srv.grpc_admin_headers,
            )
            refused, why = False, "loaded"
        except InferenceServerException as exc:
            refused, why = True, str(exc)
        echo_ok = bool(c.is_model_ready("echo"))
    named = "file: overrides are not served" in why
    ran = sentinel.exists()
    return Outcome(
        f"load {'refused' if refused else 'ACCEPTED'} ({gist(why)}); sentinel "
        f"{'WRITTEN' if ran else 'absent'}; echo ready: {echo_ok}",
        refused and named and not ran and echo_ok,
        {"code_ran": ran},
    )


# -- 3: HTTP off, hostile gRPC -----------------------------------------------------------


def _http_off(srv: LocalTriton) -> Outcome:
    flag = "--allow-http=false" in srv.command
    try:
        socket.create_connection(("127.0.0.1", srv.settings.http_port), timeout=5).close()
        said = "ACCEPTED a connection"
        refused = False
    except ConnectionRefusedError:
        said, refused = "connection refused", True
    return Outcome(
        f"port {srv.settings.http_port}: {said}; --allow-http=false on the command line: {flag}",
        refused and flag,
    )


def _grpc_hostile(srv: LocalTriton, shape: list[int], raw: bytes) -> Outcome:
    req = pb.ModelInferRequest(
        model_name="wide",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=shape)
        ],
        raw_input_contents=[raw],
    )
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(srv.grpc_url, options=unlimited) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(req, timeout=60)
            code, detail = "OK", "answered"
        except grpc.RpcError as exc:
            code, detail = exc.code().name, str(exc.details())
    time.sleep(0.2)  # a crash takes a moment to show
    alive = srv.running and procs.live(srv.grpc_url)
    serving = procs.answers(srv.grpc_url, "wide", np.ones((1, WIDE), np.float32), 10.0)
    clean = code not in ("OK", "UNAVAILABLE", "UNKNOWN", "INTERNAL", "CANCELLED")
    return Outcome(
        f"{_size(len(raw))} sent: {code} ({gist(detail)}); server alive: "
        f"{'yes' if alive else 'NO'}; wide answers: {serving}",
        clean and alive and serving,
        {"status": code, "server_alive": alive, "bytes_sent": len(raw)},
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


# -- 14: garbled config ------------------------------------------------------------------


def _garbled(srv: LocalTriton) -> Outcome:
    reason = srv.unavailable.get("garbled", "")
    named = "garbled/config.pbtxt:3" in reason
    handed = "--load-model=garbled" in srv.command
    others = [m for m in srv.settings.models if m != "garbled"]
    serving = [m for m in others if procs.ready(srv.grpc_url, m)]
    return Outcome(
        f"unavailable={sorted(srv.unavailable)}: "
        f"{gist(reason.replace(str(srv.settings.model_repository) + '/', ''))}; passed to Triton: "
        f"{handed}; {len(serving)}/{len(others)} others ready",
        named and not handed and set(srv.unavailable) == {"garbled"} and serving == others,
    )


# -- 15: refusals kept as regression checks ----------------------------------------------


def _bad_requests(main: Shared[LocalTriton]) -> list[Probe]:
    nan = np.zeros((1, 5), np.float32)
    nan[0, 2] = np.nan
    cases: list[tuple[str, str, np.ndarray[Any, Any], str]] = [
        ("15a", "wrong shape [2, 6]", np.zeros((2, 6), np.float32), "features"),
        ("15b", "wrong dtype FP64", np.zeros((2, 5), np.float64), "features"),
        ("15c", "NaN in a row", nan, "allow_nan"),
    ]
    return [
        probe(
            pid,
            name,
            f"INVALID_ARGUMENT naming 'features'{' and allow_nan' if need == 'allow_nan' else ''}"
            "; the next good request answers",
            functools.partial(_refused, main, x, need),
        )
        for pid, name, x, need in cases
    ]


def _refused(main: Shared[LocalTriton], x: np.ndarray[Any, Any], need: str) -> Outcome:
    srv = main.get()
    try:
        procs.infer(srv.grpc_url, "logit", x)
        status, text = "OK", "answered"
    except InferenceServerException as exc:
        status, text = str(exc.status()), str(exc)
    good = np.zeros((1, 5), np.float32)
    after = procs.infer(srv.grpc_url, "logit", good).as_numpy("score")
    fine = after is not None and np.allclose(after, models.oracle(LOGIT_W, good), atol=1e-6)
    return Outcome(
        f"{status.removeprefix('StatusCode.')}: {gist(text)}; next request answered: {fine}",
        status == "StatusCode.INVALID_ARGUMENT" and "features" in text and need in text and fine,
    )


def _unknown_model(srv: LocalTriton) -> Outcome:
    try:
        procs.infer(srv.grpc_url, "no_such_model", np.zeros((1, 5), np.float32))
        status, text = "OK", "answered"
    except InferenceServerException as exc:
        status, text = str(exc.status()), str(exc)
    alive = procs.live(srv.grpc_url)
    return Outcome(
        f"{status.removeprefix('StatusCode.')}: {gist(text)}; server alive: {alive}",
        status != "OK" and "unknown model" in text.lower() and alive,
    )


def _unauthenticated(srv: LocalTriton) -> Outcome:
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("get_model_repository_index", ()),
        ("load_model", ("logit",)),
        ("unload_model", ("logit",)),
        ("get_log_settings", ()),
        ("update_log_settings", ({"log_verbose_level": 1},)),
        ("register_system_shared_memory", ("r", "/k", 8)),
    ]
    refused = []
    with grpcclient.InferenceServerClient(srv.grpc_url) as c:
        for method, args in calls:
            try:
                getattr(c, method)(*args)
            except InferenceServerException as exc:
                if "restricted" in str(exc) or "admin" in str(exc):
                    refused.append(method)
        still = bool(c.is_model_ready("logit"))
    return Outcome(
        f"{len(refused)}/{len(calls)} refused; logit still ready: {still}",
        len(refused) == len(calls) and still,
        {"refused": len(refused), "calls": len(calls)},
    )


def _listening(port: int) -> set[str]:
    """Local addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6).

    An IPv4 address on an IPv6 socket (``::ffff:127.0.0.1``) is given as IPv4.
    """
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            if len(addr) == 8:
                out.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
            else:
                words = [bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8)]
                v6 = ipaddress.IPv6Address(b"".join(words))
                out.add(str(v6.ipv4_mapped or v6))
    return out


def _loopback(srv: LocalTriton) -> Outcome:
    s = srv.settings
    grpc_at, metrics_at = _listening(s.grpc_port), _listening(s.metrics_port)
    try:
        ServerSettings(s.model_repository, bind_address="0.0.0.0")
        remote = "ACCEPTED"
    except ConfigError:
        remote = "refused"
    everywhere = grpc_at | metrics_at
    loopback = all(ipaddress.ip_address(a).is_loopback for a in everywhere)
    ok = bool(grpc_at) and bool(metrics_at) and loopback and remote == "refused"
    return Outcome(
        f"gRPC listens on {sorted(grpc_at)}, metrics on {sorted(metrics_at)}; "
        f"bind_address=0.0.0.0 {remote}",
        ok,
    )


def _burst(srv: LocalTriton, concurrency: int = 256, seconds: float = 3.0) -> Outcome:
    ok, failed = asyncio.run(_flood(srv.grpc_url, concurrency, seconds))
    alive = srv.running and procs.live(srv.grpc_url)
    answers = procs.answers(srv.grpc_url, "logit", np.zeros((1, 5), np.float32), 10.0)
    return Outcome(
        f"{ok} ok, {failed} failed in {seconds:g} s at c={concurrency}; server alive: "
        f"{'yes' if alive else 'NO'}; logit answers after: {answers}",
        alive and answers and ok > 0,
        {"requests_ok": ok, "requests_failed": failed, "server_alive": alive},
    )


async def _flood(url: str, concurrency: int, seconds: float) -> tuple[int, int]:
    import tritonclient.grpc.aio as aio

    x = np.random.default_rng(0).normal(size=(1, 5)).astype(np.float32)
    counts = [0, 0]
    stop_at = time.monotonic() + seconds
    client = aio.InferenceServerClient(url)

    async def worker() -> None:
        inp = aio.InferInput("features", [1, 5], "FP32")
        inp.set_data_from_numpy(x)
        while time.monotonic() < stop_at:
            try:
                await client.infer("logit", [inp], client_timeout=10.0)
                counts[0] += 1
            except InferenceServerException:
                counts[1] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return counts[0], counts[1]
