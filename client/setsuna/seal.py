"""Signed seals on published model folders: what may be loaded, and who published it.

``manifest.json`` says what a version folder holds, but anyone who can write
the folder can also re-hash the manifest. A *seal* closes that: the publisher
signs, with an Ed25519 key only it holds, the sha256 of every file of the
version folder (``manifest.json`` and ``model.py`` included) and of the
model's ``config.pbtxt``; the serving side holds only public keys. A file
changed, missing or added (a planted ``__pycache__/model.*.pyc``, a
``model.<abi>.so``), a re-hashed manifest, an edited config or a seal signed
by an unknown key all fail :func:`verify_version`.

Keys (created on first use, for a developer's machine; a desk provisions its
own):

* signing key: ``$SETSUNA_SIGNING_KEY`` or ``~/.config/setsuna/signing_key``
  (PKCS#8 PEM, mode 0600), read by the build only;
* trusted keys: ``$SETSUNA_TRUSTED_KEYS`` or ``~/.config/setsuna/trusted_keys``,
  one base64 raw public key per line (``#`` comments), read by the server.
  :func:`signing_key` appends the public half of a key it generates.

Hashes are checked over the very bytes that are then used where it matters:
:func:`verify_version` returns ``model.py``'s bytes so the stub guard
compiles exactly what was verified (no second read).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from setsuna.errors import ArtifactError, ConfigError, TamperedArtifactError

SEAL_NAME: Final = "seal.json"
CONFIG_NAME: Final = "config.pbtxt"
FORMAT: Final = "setsuna.seal/1"
SIGNING_KEY_ENV: Final = "SETSUNA_SIGNING_KEY"
TRUSTED_KEYS_ENV: Final = "SETSUNA_TRUSTED_KEYS"
_CHUNK_BYTES: Final = 1 << 20


def _config_home() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "setsuna"


def signing_key_path() -> Path:
    env = os.environ.get(SIGNING_KEY_ENV)
    return Path(env) if env else _config_home() / "signing_key"


def trusted_keys_path() -> Path:
    env = os.environ.get(TRUSTED_KEYS_ENV)
    return Path(env) if env else _config_home() / "trusted_keys"


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key: names a key in messages."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_public(public: Ed25519PublicKey) -> str:
    """The line a trusted-keys file holds for ``public``."""
    return base64.b64encode(_raw(public)).decode()


def check_private_file(path: Path) -> None:
    """Refuse a key file another user owns or may write (or, for a private key, read)."""
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(
            f"{path} is owned by uid {st.st_uid} or writable by others (mode "
            f"{st.st_mode & 0o777:o}): whoever can write it decides which models load; "
            f"chmod go-w {path} (and own it)"
        )


def signing_key(path: Path | None = None, *, create: bool = True) -> Ed25519PrivateKey:
    """The publisher's private key; generated (0600) and trusted on first use if allowed."""
    path = signing_key_path() if path is None else path
    if not path.exists():
        if not create:
            raise ConfigError(
                f"no signing key at {path}: set ${SIGNING_KEY_ENV} to the publisher's key"
            )
        return _create_key(path)
    check_private_file(path)
    if path.stat().st_mode & 0o044:
        raise ConfigError(f"{path} is readable by others: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def _create_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    trust(key.public_key())
    return key


def trust(public: Ed25519PublicKey, path: Path | None = None) -> None:
    """Append ``public`` to the trusted-keys file (created 0644, owner-writable only)."""
    path = trusted_keys_path() if path is None else path
    line = encode_public(public)
    if path.exists():
        check_private_file(path)
        if line in path.read_text().split():
            return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(f"# added by setsuna for key {key_id(public)}\n{line}\n")


def trusted_keys(path: Path | None = None) -> dict[str, Ed25519PublicKey]:
    """The keys whose seals the server accepts, by :func:`key_id`."""
    path = trusted_keys_path() if path is None else path
    if not path.is_file():
        raise ConfigError(
            f"no trusted keys at {path}: publish a model first (the build creates a key "
            f"and trusts it) or set ${TRUSTED_KEYS_ENV} to the publisher's public keys"
        )
    check_private_file(path)
    keys: dict[str, Ed25519PublicKey] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            public = Ed25519PublicKey.from_public_bytes(base64.b64decode(line, validate=True))
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: not a base64 Ed25519 public key ({exc})") from exc
        keys[key_id(public)] = public
    if not keys:
        raise ConfigError(f"{path} lists no keys: add the publisher's public key")
    return keys


# --------------------------------------------------------------------------- seal


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> Iterable[Path]:
    """Every entry under ``folder`` but the seal; a symlink or special file is listed too.

    A symlink to a directory is listed, not skipped: ``rglob`` does not descend
    into it, so skipping it as a directory would let a ``__pycache__`` linked
    to a folder outside (holding a ``model.*.pyc``) pass unseen.
    """
    for path in sorted(folder.rglob("*")):
        if path.relative_to(folder).as_posix() == SEAL_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            continue
        yield path


def _payload(model: str, version: str, config_sha256: str, files: Mapping[str, str]) -> bytes:
    body = {
        "format": FORMAT,
        "model": model,
        "version": version,
        "config_sha256": config_sha256,
        "files": dict(sorted(files.items())),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal_version(version_dir: Path, key: Ed25519PrivateKey | None = None) -> Path:
    """Sign ``version_dir`` (every file) and its model's ``config.pbtxt``; write the seal."""
    key = signing_key() if key is None else key
    model_dir = version_dir.parent
    config = model_dir / CONFIG_NAME
    if not config.is_file():
        raise ArtifactError(f"{config} is missing: write the config before sealing")
    files = {}
    for path in _files(version_dir):
        if path.is_symlink() or not path.is_file():
            raise ArtifactError(f"{path}: only regular files can be sealed")
        files[path.relative_to(version_dir).as_posix()] = _sha256_file(path)
    payload = _payload(model_dir.name, version_dir.name, _sha256_file(config), files)
    doc = {
        "payload": json.loads(payload),
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(payload)).decode(),
    }
    out = version_dir / SEAL_NAME
    fd, tmp = tempfile.mkstemp(prefix=".seal-", dir=version_dir)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    Path(tmp).replace(out)
    return out


def seal_model(model_dir: Path, key: Ed25519PrivateKey | None = None) -> list[Path]:
    """Seal every version folder (named by digits) of ``model_dir``."""
    key = signing_key() if key is None else key
    versions = [p for p in sorted(model_dir.iterdir()) if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise ArtifactError(f"{model_dir} has no version folder to seal")
    return [seal_version(v, key) for v in versions]


@dataclass(frozen=True)
class Verified:
    """A version folder whose seal holds: who signed it and ``model.py``'s verified bytes."""

    key_id: str
    model_py: bytes | None


def verify_version(
    version_dir: Path, keys: Mapping[str, Ed25519PublicKey] | None = None
) -> Verified:
    """Check the seal's signature, ``config.pbtxt`` and every file of ``version_dir``.

    Raises :class:`TamperedArtifactError` naming the first offending file.
    """
    keys = trusted_keys() if keys is None else keys
    model_dir = version_dir.parent
    seal_path = version_dir / SEAL_NAME
    payload, doc = _read_seal(seal_path)
    kid = str(doc.get("key_id", ""))
    public = keys.get(kid)
    if public is None:
        raise TamperedArtifactError(
            f"{seal_path}: signed by key {kid or '?'}, which is not trusted "
            f"({trusted_keys_path()}): republish it with a trusted key"
        )
    try:
        public.verify(base64.b64decode(str(doc.get("signature", "")), validate=True), payload)
    except (InvalidSignature, ValueError):
        raise TamperedArtifactError(
            f"{seal_path}: the signature does not match its contents (edited or re-hashed "
            "after publishing); do not serve it, republish the model"
        ) from None
    body = json.loads(payload)
    if (body.get("model"), body.get("version")) != (model_dir.name, version_dir.name):
        raise TamperedArtifactError(
            f"{seal_path} seals {body.get('model')}/{body.get('version')}, not "
            f"{model_dir.name}/{version_dir.name}: a folder was copied or renamed"
        )
    config = model_dir / CONFIG_NAME
    if not config.is_file() or _sha256_file(config) != body.get("config_sha256"):
        raise TamperedArtifactError(
            f"{config} differs from the sealed config (or is missing): configs are "
            "published with their model; republish it"
        )
    return Verified(kid, _check_files(version_dir, dict(body.get("files", {}))))


def _read_seal(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
        payload = json.dumps(doc["payload"], sort_keys=True, separators=(",", ":")).encode()
    except FileNotFoundError:
        raise TamperedArtifactError(
            f"{path} is missing: this folder was not published by setsuna (or its seal "
            "was removed); only sealed folders load. Publish it with the build."
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TamperedArtifactError(f"{path} is unreadable or malformed: {exc}") from exc
    if not isinstance(doc, dict):
        raise TamperedArtifactError(f"{path} is malformed: not a JSON object")
    return payload, doc


def _check_files(version_dir: Path, sealed: Mapping[str, str]) -> bytes | None:
    model_py: bytes | None = None
    seen = set()
    for path in _files(version_dir):
        name = path.relative_to(version_dir).as_posix()
        if name not in sealed:
            raise TamperedArtifactError(
                f"{version_dir}: {name} is not in the seal (planted after publishing); "
                "remove it or republish the model"
            )
        if path.is_symlink() or not path.is_file():
            raise TamperedArtifactError(f"{version_dir}: {name} is not a regular file")
        if name == "model.py":
            data = path.read_bytes()
            digest = sha256_bytes(data)
            model_py = data
        else:
            digest = _sha256_file(path)
        if digest != sealed[name]:
            raise TamperedArtifactError(
                f"{version_dir}: sha256 of {name} does not match the seal; the file was "
                "modified after publishing. Do not serve it: republish the model"
            )
        seen.add(name)
    missing = sorted(set(sealed) - seen)
    if missing:
        raise TamperedArtifactError(f"{version_dir}: missing {missing}; republish the model")
    return model_py


def remove_seal(version_dir: Path) -> None:
    """Drop a seal (before rewriting a folder's files)."""
    with contextlib.suppress(FileNotFoundError):
        (version_dir / SEAL_NAME).unlink()
