"""The native backend's load-time check (native/forest/verify.c) against real sealed folders.

Folders are written and sealed by setsuna's own code (manifest.write, seal.seal_version) and
then changed the ways an attacker or an accident would; the C verifier must refuse exactly what
setsuna.seal.verify_version + setsuna.manifest.verify refuse, naming the file, and must accept
what they accept (canonical JSON included: the signature is over Python's json.dumps bytes).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setsuna import manifest, seal
from setsuna.errors import ArtifactError, ConfigError
from setsuna.runtime.trees import cpu_flags
from setsuna.schema import FeatureSchema

SOURCES = Path(__file__).resolve().parents[3] / "client" / "setsuna" / "native" / "forest"
N_FEATURES = 4
TL2CGEN_BYTES = b"\x7fELF tl2cgen stand-in " + bytes(range(256)) * 4
LLEAVES_BYTES = b"\x7fELF lleaves stand-in " + bytes(range(255, -1, -1)) * 4
CONFIG = 'name: "{name}"\nbackend: "setsuna_forest"\nmax_batch_size: 8\n'


class EngineSpec(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("lib", ctypes.c_char * 256),
        ("lib_fd", ctypes.c_int),
        ("n_features", ctypes.c_int),
    ]


class SfManifest(ctypes.Structure):
    _fields_ = [
        ("model", ctypes.c_char * 256),
        ("engine", ctypes.c_char * 32),
        ("n_features", ctypes.c_int),
        ("allow_nan", ctypes.c_int),
        ("feature_names", ctypes.POINTER(ctypes.c_char_p)),
        ("threshold_rows", ctypes.c_int),
        ("small", EngineSpec),
        ("large", EngineSpec),
        ("signer_key_id", ctypes.c_char * 17),
    ]


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """libsfverify.so built from the sources with the backend's flags (warnings are errors)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc) on this host: the native verifier cannot be built")
    out = tmp_path_factory.mktemp("sfverify") / "libsfverify.so"
    flags = "-std=c11 -D_GNU_SOURCE -O2 -Wall -Wextra -Werror -shared -fPIC -fvisibility=hidden"
    sources = [str(SOURCES / f) for f in ("json.c", "crypto.c", "verify.c")]
    subprocess.run([cc, *flags.split(), "-o", str(out), *sources, "-ldl"], check=True)
    dll = ctypes.CDLL(str(out))
    dll.sf_verify_describe.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    dll.sf_verify_describe.restype = ctypes.c_int
    dll.sf_verify_version.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(SfManifest),
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    dll.sf_verify_version.restype = ctypes.c_int
    dll.sf_manifest_release.argtypes = [ctypes.POINTER(SfManifest)]
    dll.sf_manifest_release.restype = None
    dll.sf_cpu_flags.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    dll.sf_cpu_flags.restype = None
    return dll


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ed25519PrivateKey]:
    """A signing key and trust file for this test only (the C side reads the same env)."""
    monkeypatch.setenv(seal.SIGNING_KEY_ENV, str(tmp_path / "keys" / "signing_key"))
    monkeypatch.setenv(seal.TRUSTED_KEYS_ENV, str(tmp_path / "keys" / "trusted_keys"))
    yield seal.signing_key()


def describe(lib: ctypes.CDLL, version: Path, trusted_keys: Path | None = None) -> str:
    buf = ctypes.create_string_buffer(8192)
    keys_arg = None if trusted_keys is None else str(trusted_keys).encode()
    rc = lib.sf_verify_describe(os.fsencode(version), keys_arg, buf, len(buf))
    text = buf.value.decode("utf-8", "replace")
    assert (rc == 0) == text.startswith("ok "), (rc, text)
    return text


def python_refusal(version: Path) -> str | None:
    """What setsuna's own checks say about ``version``: None if it verifies."""
    try:
        seal.verify_version(version)
        manifest.verify(version)
    except (ArtifactError, ConfigError) as exc:
        return str(exc)
    return None


def tl2cgen_params() -> dict[str, Any]:
    return {"lib": "tl2cgen-forest.so", "threads": 1}


def lleaves_params(flags: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"lib": "lleaves-forest.so", "n_features": N_FEATURES, "threads": 1}
    params["cpu_flags_sha256"] = cpu_flags() if flags is None else flags
    return params


def switch_params() -> dict[str, Any]:
    return {
        "threshold_rows": 32,
        "small": {"engine": "tl2cgen", "params": tl2cgen_params()},
        "large": {"engine": "lleaves", "params": lleaves_params()},
    }


def forest_folder(
    repo: Path,
    name: str = "forest",
    *,
    engine: str = "tl2cgen",
    params: Mapping[str, Any] | None = None,
    extra: Mapping[str, bytes] | None = None,
    schema: FeatureSchema | None = None,
) -> Path:
    """A published version folder ``repo/name/1`` as the build writes it, sealed."""
    version = repo / name / "1"
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text(CONFIG.format(name=name))
    (version / "tl2cgen-forest.so").write_bytes(TL2CGEN_BYTES)
    (version / "lleaves-forest.so").write_bytes(LLEAVES_BYTES)
    (version / "model.py").write_text("# the Python wrapper's entry point\n")
    (version / "gate_report.json").write_text('{"passed": true}\n')
    for rel, data in (extra or {}).items():
        (version / rel).parent.mkdir(parents=True, exist_ok=True)
        (version / rel).write_bytes(data)
    m = manifest.Manifest(
        model=name,
        engine=engine,
        candidate=engine,
        task="classification",
        schema=schema or FeatureSchema.tabular(N_FEATURES),
        source={"kind": "lightgbm", "sha256": "0" * 64, "label": "lightgbm.Booster.predict"},
        files=manifest.hash_folder(version),
        engine_params=dict(tl2cgen_params() if params is None else params),
        gate={"min_identical_decisions": 0.999, "figures": {"p50_us": 3.5, "passed": True}},
    )
    manifest.write(version, m)
    seal.seal_version(version)
    return version


def reseal_manifest(version: Path, **changes: Any) -> None:
    """Rewrite manifest.json with ``changes`` and re-seal (a publisher's mistake, not tampering)."""
    doc = json.loads((version / "manifest.json").read_text())
    doc.update(changes)
    (version / "manifest.json").write_text(json.dumps(doc, indent=2))
    seal.seal_version(version)


# --------------------------------------------------------------------------- accepted


def test_a_sealed_tl2cgen_folder_verifies_like_python(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    assert python_refusal(version) is None
    assert describe(lib, version) == (
        "ok engine=tl2cgen model=forest n_features=4 allow_nan=0 threshold_rows=0 "
        "small=1:tl2cgen-forest.so:1 large=0::0"
    )
    # A trailing slash and an explicit trusted-keys path change nothing.
    keys_file = seal.trusted_keys_path()
    assert describe(lib, Path(f"{version}/"), keys_file).startswith("ok engine=tl2cgen")


def test_a_sealed_switch_folder_verifies_like_python(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path, "eurusd", engine="switch", params=switch_params())
    assert python_refusal(version) is None
    assert describe(lib, version) == (
        "ok engine=switch model=eurusd n_features=4 allow_nan=0 threshold_rows=32 "
        "small=1:tl2cgen-forest.so:1 large=2:lleaves-forest.so:1"
    )


def test_the_struct_holds_the_verified_bytes_in_sealed_memfds(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    schema = FeatureSchema(("ret_1", "rsi_14", "é", "vol"), (N_FEATURES,), allow_nan=True)
    version = forest_folder(
        tmp_path, "eurusd", engine="switch", params=switch_params(), schema=schema
    )
    m = SfManifest()
    err = ctypes.create_string_buffer(2048)
    assert lib.sf_verify_version(os.fsencode(version), None, ctypes.byref(m), err, 2048) == 0, (
        err.value
    )
    try:
        assert (m.model, m.engine, m.n_features, m.allow_nan) == (b"eurusd", b"switch", 4, 1)
        names = [m.feature_names[k].decode() for k in range(m.n_features)]
        assert names == list(schema.names)
        assert m.signer_key_id.decode() == seal.key_id(keys.public_key())
        assert (m.small.kind, m.small.n_features, m.large.kind, m.large.n_features) == (1, -1, 2, 4)
        for spec, data in ((m.small, TL2CGEN_BYTES), (m.large, LLEAVES_BYTES)):
            assert Path(f"/proc/self/fd/{spec.lib_fd}").read_bytes() == data
            with pytest.raises(PermissionError):  # sealed: nobody rewrites it after the check
                os.write(spec.lib_fd, b"x")
        fds = (m.small.lib_fd, m.large.lib_fd)
    finally:
        lib.sf_manifest_release(ctypes.byref(m))
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert (m.small.lib_fd, m.large.lib_fd, m.small.kind) == (-1, -1, 0)
    lib.sf_manifest_release(ctypes.byref(m))  # releasing twice is harmless
    lib.sf_manifest_release(ctypes.byref(SfManifest()))  # and so is a zeroed struct


def test_non_ascii_and_control_character_names_verify(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    """The signed bytes are json.dumps(ensure_ascii=True): \\u escapes, surrogate pairs, \\t."""
    odd = ["é.txt", "a\tb", "ctl\x01\x1f.txt", "del\x7f", "日本.txt", "emoji😀.bin", 'q"uo\\te']
    extra = {name: name.encode() for name in odd}
    extra["nested/dir/é/x.txt"] = b"deep"
    version = forest_folder(tmp_path, extra=extra)
    payload = json.loads((version / "seal.json").read_text())["payload"]
    assert set(odd) <= set(payload["files"])
    assert python_refusal(version) is None
    assert describe(lib, version).startswith("ok engine=tl2cgen")


# --------------------------------------------------------------------------- refused


def assert_refused(lib: ctypes.CDLL, version: Path, *fragments: str, python: bool = True) -> str:
    """C refuses naming every fragment (and, for what Python checks too, Python refuses)."""
    text = describe(lib, version)
    assert text.startswith("error: "), text
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text
    if python:
        assert python_refusal(version) is not None
    return text


def test_a_modified_library_byte(lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = forest_folder(tmp_path)
    data = bytearray(TL2CGEN_BYTES)
    data[100] ^= 1
    (version / "tl2cgen-forest.so").write_bytes(bytes(data))
    text = assert_refused(lib, version, "sha256 of tl2cgen-forest.so does not match the seal")
    assert str(version) in text and "republish" in text


def test_a_missing_file(lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = forest_folder(tmp_path)
    (version / "gate_report.json").unlink()
    assert_refused(lib, version, "missing ['gate_report.json']")


@pytest.mark.parametrize("planted", ["extra.so", "__pycache__/model.cpython-311.pyc", ".hidden"])
def test_a_planted_file(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey, planted: str
) -> None:
    version = forest_folder(tmp_path)
    (version / planted).parent.mkdir(exist_ok=True)
    (version / planted).write_bytes(b"planted")
    assert_refused(lib, version, f"{planted} is not in the seal")


def test_a_symlink_in_place_of_a_file(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    outside = tmp_path / "outside.so"
    outside.write_bytes(TL2CGEN_BYTES)  # the very bytes that were sealed
    (version / "tl2cgen-forest.so").unlink()
    (version / "tl2cgen-forest.so").symlink_to(outside)
    assert_refused(lib, version, "tl2cgen-forest.so is not a regular file")


def test_a_symlinked_directory_is_refused(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    """Stricter than Python, whose rglob walk skips a symlink to a directory entirely."""
    version = forest_folder(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.cpython-311.pyc").write_bytes(b"planted")
    (version / "__pycache__").symlink_to(tmp_path / "elsewhere")
    assert_refused(lib, version, "__pycache__ is not in the seal", python=False)


def test_a_rehashed_manifest(lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = forest_folder(tmp_path)
    evil = TL2CGEN_BYTES + b"payload"
    (version / "tl2cgen-forest.so").write_bytes(evil)
    doc = json.loads((version / "manifest.json").read_text())
    doc["files"]["tl2cgen-forest.so"] = seal.sha256_bytes(evil)
    (version / "manifest.json").write_text(json.dumps(doc))
    manifest.verify(version)  # the re-hash satisfies the manifest alone
    assert_refused(lib, version, "sha256 of manifest.json does not match the seal")
    # ... and re-hashing the seal's payload too breaks its signature.
    sealed = json.loads((version / "seal.json").read_text())
    for name in ("tl2cgen-forest.so", "manifest.json"):
        sealed["payload"]["files"][name] = manifest.sha256_file(version / name)
    (version / "seal.json").write_text(json.dumps(sealed))
    assert_refused(lib, version, "seal.json: the signature does not match")


def test_an_edited_config(lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = forest_folder(tmp_path)
    config = version.parent / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 4096"))
    assert_refused(lib, version, "config.pbtxt differs from the sealed config")
    config.unlink()
    assert_refused(lib, version, "config.pbtxt differs from the sealed config")


def test_a_seal_by_an_untrusted_key(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    outsider = Ed25519PrivateKey.generate()
    seal.seal_version(version, outsider)
    assert_refused(lib, version, f"signed by key {seal.key_id(outsider.public_key())}", "trusted")


def test_a_seal_copied_to_another_model(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path, "alpha")
    other = forest_folder(tmp_path, "beta")
    shutil.copy(version / "seal.json", other / "seal.json")
    assert_refused(lib, other, "seals alpha/1, not beta/1")


@pytest.mark.parametrize("signature", [base64.b64encode(bytes(64)).decode(), "!!!!", "", 7])
def test_a_bad_signature(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey, signature: object
) -> None:
    version = forest_folder(tmp_path)
    doc = json.loads((version / "seal.json").read_text())
    doc["signature"] = signature
    (version / "seal.json").write_text(json.dumps(doc))
    assert_refused(lib, version, "seal.json: the signature does not match its contents")


def test_a_missing_seal(lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey) -> None:
    version = forest_folder(tmp_path)
    (version / "seal.json").unlink()
    assert_refused(lib, version, "seal.json is missing", "only sealed folders load")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"payload": {}, "payload": {}}',  # a duplicate key: two readers could disagree
        '{"payload": {"files": {}, "n": 1.5}, "key_id": "x", "signature": ""}',
        "[" * 100_000,  # nesting: refused at depth 64, never a stack overflow
        '{"payload": "\\ud800"}',
        '{"payload": NaN}',
        '{"payload": {}}\x00',
    ],
)
def test_a_malformed_seal_is_refused_without_crashing(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey, text: str
) -> None:
    version = forest_folder(tmp_path)
    (version / "seal.json").write_text(text)
    assert_refused(lib, version, "seal.json", python=False)


def test_a_number_in_the_payload_is_refused_before_the_signature(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    """A payload never holds numbers: the C side does not reproduce Python's float repr."""
    version = forest_folder(tmp_path)
    doc = json.loads((version / "seal.json").read_text())
    doc["payload"]["extra"] = 1.5
    (version / "seal.json").write_text(json.dumps(doc))
    assert_refused(lib, version, "seal.json is malformed: its payload holds a number (1.5)")


def test_the_default_trusted_keys_path(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SETSUNA_TRUSTED_KEYS, else $XDG_CONFIG_HOME/setsuna, else $HOME/.config/setsuna."""
    version = forest_folder(tmp_path)
    trusted = seal.trusted_keys_path().read_bytes()
    monkeypatch.delenv(seal.TRUSTED_KEYS_ENV)
    for home, xdg in ((tmp_path / "home", tmp_path / "xdg"), (tmp_path / "home", None)):
        monkeypatch.setenv("HOME", str(home))
        if xdg is None:
            monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
        expected = seal.trusted_keys_path()
        assert_refused(lib, version, f"no trusted keys at {expected}")
        expected.parent.mkdir(parents=True)
        expected.write_bytes(trusted)
        assert describe(lib, version).startswith("ok "), expected


def test_every_truncation_of_a_seal_is_refused(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    whole = (version / "seal.json").read_bytes()
    for n in range(0, len(whole) - 2, 7):
        (version / "seal.json").write_bytes(whole[:n])
        assert describe(lib, version).startswith("error: "), n


def test_a_group_writable_trusted_keys_file(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    keys_file = seal.trusted_keys_path()
    keys_file.chmod(0o664)
    assert_refused(lib, version, f"{keys_file} is owned by uid", "writable by others")


def test_a_trusted_keys_file_with_a_bad_line(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    keys_file = seal.trusted_keys_path()
    with keys_file.open("a") as f:
        f.write("\n   # a comment\n\nnot-base64==\n")
    text = assert_refused(lib, version, "not a base64 Ed25519 public key")
    assert f"{keys_file}:{len(keys_file.read_text().splitlines())}:" in text
    keys_file.write_text("# nothing here\n")
    assert_refused(lib, version, "lists no keys")
    keys_file.unlink()
    assert_refused(lib, version, "no trusted keys at")


def test_an_engine_the_backend_does_not_serve(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    reseal_manifest(version, engine="onnx")
    assert_refused(lib, version, "manifest.json", "engine onnx is not served", python=False)


@pytest.mark.parametrize(
    "name", ["../forest/1/tl2cgen-forest.so", "sub/tl2cgen-forest.so", "..", ".hidden.so", ""]
)
def test_a_library_name_that_is_not_a_plain_file_name(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey, name: str
) -> None:
    version = forest_folder(tmp_path)
    reseal_manifest(version, engine_params={"lib": name})
    assert_refused(lib, version, "manifest.json", "is not a plain file name", python=False)


def test_a_library_the_manifest_does_not_list(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    reseal_manifest(version, engine_params={"lib": "absent.so"})
    assert_refused(lib, version, "absent.so is not in the folder's verified files", python=False)


def test_a_lleaves_library_built_for_another_cpu(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    here = cpu_flags()
    if not here:
        pytest.skip("this host's /proc/cpuinfo has no flags: the check is skipped by design")
    version = forest_folder(tmp_path, engine="lleaves", params=lleaves_params("0" * 16))
    assert_refused(
        lib,
        version,
        "lleaves-forest.so was compiled for a CPU with flags hash 0000000000000000",
        f"this host's is {here}",
        "Rebuild the model on this host",
        python=False,
    )
    reseal_manifest(version, engine_params=lleaves_params(here))
    assert describe(lib, version).startswith("ok engine=lleaves")


@pytest.mark.parametrize(
    ("engine", "params", "fragment"),
    [
        ("lleaves", {"lib": "lleaves-forest.so", "n_features": 5}, "n_features"),
        ("lleaves", {"lib": "lleaves-forest.so"}, "n_features"),
        ("switch", {**switch_params(), "threshold_rows": 1}, "threshold_rows"),
        ("switch", {**switch_params(), "large": {"engine": "onnx", "params": {}}}, "onnx"),
        ("switch", {"threshold_rows": 32, "small": {"engine": "tl2cgen"}}, "switch"),
    ],
)
def test_malformed_engine_params(
    lib: ctypes.CDLL,
    tmp_path: Path,
    keys: Ed25519PrivateKey,
    engine: str,
    params: dict[str, Any],
    fragment: str,
) -> None:
    version = forest_folder(tmp_path, engine=engine, params=params)
    assert_refused(lib, version, "manifest.json", fragment, python=False)


def test_a_schema_that_is_not_flat_rows(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    version = forest_folder(tmp_path)
    schema = FeatureSchema.tabular(N_FEATURES).to_json()
    reseal_manifest(version, schema={**schema, "row_shape": [2, 2]})
    assert_refused(lib, version, "row_shape", python=False)
    reseal_manifest(version, schema={**schema, "names": ["a"]})
    assert_refused(lib, version, "names 1 features", python=False)


def test_a_manifest_that_lists_other_files(
    lib: ctypes.CDLL, tmp_path: Path, keys: Ed25519PrivateKey
) -> None:
    """Sealed as is (a broken build, not tampering): manifest.verify's three messages."""
    version = forest_folder(tmp_path)
    files = json.loads((version / "manifest.json").read_text())["files"]
    reseal_manifest(version, files={**files, "gone.bin": "0" * 64})
    assert_refused(lib, version, "missing ['gone.bin'] listed in manifest.json")
    reseal_manifest(version, files={**files, "model.py": "0" * 64})
    assert_refused(lib, version, "sha256 of ['model.py'] does not match manifest.json")
    reseal_manifest(version, files={k: v for k, v in files.items() if k != "model.py"})
    assert_refused(lib, version, "unexpected files ['model.py'] not listed in manifest.json")
    reseal_manifest(version, format=2, files=files)
    assert_refused(lib, version, "manifest format 2 is not 1")


# --------------------------------------------------------------------------- cpu flags


def c_cpu_flags(lib: ctypes.CDLL, path: Path) -> str:
    out = ctypes.create_string_buffer(17)
    lib.sf_cpu_flags(str(path).encode(), out)
    return out.value.decode()


def test_cpu_flags_match_python(lib: ctypes.CDLL, tmp_path: Path) -> None:
    proc = Path("/proc/cpuinfo")
    assert c_cpu_flags(lib, proc) == cpu_flags(proc)
    synthetic = tmp_path / "cpuinfo"
    synthetic.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t:  Test CPU @ 3.0GHz \n"
        "flags\t\t: sse2 avx2  fpu\tavx512f sse\n\nprocessor\t: 1\nflags\t\t: other\n"
    )
    assert c_cpu_flags(lib, synthetic) == cpu_flags(synthetic) != ""
    synthetic.write_text("flags : b a\n")  # no model name: the hash still has "|"
    assert c_cpu_flags(lib, synthetic) == cpu_flags(synthetic) != ""
    synthetic.write_text("processor : 0\nmodel name : x\n")
    assert c_cpu_flags(lib, synthetic) == cpu_flags(synthetic) == ""
    assert c_cpu_flags(lib, tmp_path / "absent") == cpu_flags(tmp_path / "absent") == ""
