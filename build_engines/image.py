"""``python -m build_engines.image``: the container image's model repository, built in the image.

deploy/container/Dockerfile runs this in its ``engines`` stage, inside the
NGC image, so every compiled engine (tl2cgen's ``.so``, lleaves' object
code, the ``setsuna_forest`` backend) links against that image's C library
rather than the build host's. It writes, under ``--out``:

- ``models/``: the engines in setsuna's layout (``build_engines --target
  local``: Python-backend wrappers and ``setsuna_forest`` forests, which the
  ensembles call by ``features``/``score`` and load in process) and, when the
  example arms are there, the whole decision stack (``python -m ensembles
  --target container``: router, decide, decision, signal, combiner,
  selector, feedback) with its run-time state under ``--state-dir``;
- ``backends/setsuna_forest/``: the native backend, for
  ``/opt/tritonserver/backends``;
- ``trusted_keys``: the public half of the key that sealed every version,
  which the server reads through ``$SETSUNA_TRUSTED_KEYS``.

The signing key: the publisher's, when ``--signing-key`` names a file (the
Dockerfile passes a BuildKit secret, mounted for one ``RUN`` and never in a
layer); otherwise a key made for this build alone, written only under
``--ephemeral-key-dir`` (a tmpfs mount in the Dockerfile, so no layer holds it)
and gone when the step ends. An image sealed that way trusts only itself:
versions a desk publishes later with its own key need that key's public half
added to the trusted keys (mount the desk's file and point
``$SETSUNA_TRUSTED_KEYS`` at it). The last step verifies every seal against
``trusted_keys``, so an image whose repository would not load is never
produced.

Exit status as ``python -m build_engines``: 0 done, 1 a gate rejected a
model, 2 bad input or environment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from build_engines import __main__ as build_main
from setsuna import native_forest, seal
from setsuna.errors import ConfigError, SetsunaError

#: Where the Dockerfile mounts the publisher's key (``--secret id=setsuna_signing_key``).
SECRET_KEY = Path("/run/secrets/setsuna_signing_key")
#: The example arms and shadow the ensembles need (``ensembles.__main__``'s ARMS, SHADOW).
STACK_ARMS = ("lightgbm", "xgboost", "mlp")
#: ``ensembles.__main__.CONTAINER_STATE_DIR``: the image's writable volume.
STATE_DIR = Path("/var/lib/setsuna")


def _ensembles(*args: str) -> int:
    """``python -m ensembles`` (a sibling package: called by its CLI, as the Makefile does)."""
    done = subprocess.run([sys.executable, "-m", "ensembles", *args], check=False)
    return done.returncode


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the build's duration (the seal reads them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def signing_key_file(given: Path | None, ephemeral_dir: Path) -> tuple[Path, bool]:
    """The key file to seal with, and whether it was made for this build only."""
    if given is not None and given.is_file():
        seal.signing_key(given, create=False)  # readable, ours, 0600: checked before any build
        return given, False
    if given is not None and given != SECRET_KEY:
        raise ConfigError(f"--signing-key {given}: no such file")
    if not ephemeral_dir.is_dir():
        raise ConfigError(
            f"no signing key at {SECRET_KEY} and no folder {ephemeral_dir} for a build key: pass "
            "the publisher's key as a BuildKit secret (`make image SIGNING_KEY=...`) or mount a "
            "tmpfs there"
        )
    path = ephemeral_dir / "signing_key"
    if path.exists():
        path.unlink()
    return path, True


def build(
    out: Path,
    *,
    build_args: Sequence[str],
    signing_key: Path | None,
    ephemeral_key_dir: Path,
    state_dir: Path,
    outcomes_db: str | None = None,
) -> int:
    """Write models/, backends/ and trusted_keys under ``out``; the exit status.

    ``outcomes_db``: a ``postgresql://`` URL (no password: libpq reads
    ``PGPASSWORD``/``PGPASSFILE`` in the container) for the selector's and
    feedback's outcomes, shared by every replica; default: SQLite under
    ``state_dir``, one per container.
    """
    shared = ["--outcomes-db", outcomes_db] if outcomes_db else []
    settings = ["--target", "container", "--state-dir", str(state_dir), *shared]
    # A bad URL or state folder fails now, not after minutes of engines.
    if _ensembles(*settings, "--check-only") != 0:
        raise ConfigError("the ensembles' settings were refused (above); nothing was built")
    models = out / "models"
    if models.exists() or (out / "trusted_keys").exists():
        raise ConfigError(f"{out} already holds an image repository: give an empty --out")
    key, ephemeral = signing_key_file(signing_key, ephemeral_key_dir)
    try:
        return _build(out, key, ephemeral, build_args, settings)
    finally:  # a failed build leaves no build-only key behind either
        if ephemeral:
            key.unlink(missing_ok=True)


def _build(
    out: Path, key: Path, ephemeral: bool, build_args: Sequence[str], settings: list[str]
) -> int:
    models = out / "models"
    out.mkdir(parents=True, exist_ok=True)
    trusted = out / "trusted_keys"
    with _environment(**{seal.SIGNING_KEY_ENV: str(key), seal.TRUSTED_KEYS_ENV: str(trusted)}):
        if ephemeral:
            print(
                "note: no publisher key given; sealing with a key made for this build only "
                "(the image trusts only it; see build_engines/image.py)",
                file=sys.stderr,
            )
        # A generated key trusts itself; a given one is trusted here explicitly.
        seal.trust(seal.signing_key(key, create=ephemeral).public_key(), trusted)
        folder, why = native_forest.available()
        if folder is None:
            raise ConfigError(
                f"setsuna_forest cannot be built here ({why}): install a C compiler in the "
                "engines stage"
            )
        (out / "backends").mkdir(exist_ok=True)
        native_forest.install(out / "backends")
        status = build_main.main(
            ["--target", "local", "--out", str(out / "build"), "--workdir", str(out / "work"),
             *build_args]
        )  # fmt: skip
        if status != 0:
            return status
        (out / "build" / "local").rename(models)
        shutil.rmtree(out / "build")
        shutil.rmtree(out / "work", ignore_errors=True)
        if all((models / m / "1").is_dir() for m in STACK_ARMS):
            status = _ensembles(*settings, "--model-repository", str(models))
            if status != 0:
                return status
        else:
            print(f"note: {STACK_ARMS} not all built: engines only, no ensembles", file=sys.stderr)
        verify(models, trusted)
    return 0


def verify(models: Path, trusted: Path) -> list[Path]:
    """Every version folder's seal against ``trusted``; the folders verified."""
    keys = seal.trusted_keys(trusted)
    done = []
    for version_dir in sorted(models.glob("*/[0-9]*")):
        if version_dir.is_dir():
            seal.verify_version(version_dir, keys)
            done.append(version_dir)
    if not done:
        raise ConfigError(f"{models} holds no version folder: nothing was built")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m build_engines.image", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="an empty folder")
    p.add_argument(
        "--signing-key",
        type=Path,
        default=SECRET_KEY,
        help="the publisher's Ed25519 key (default: the BuildKit secret's mount point)",
    )
    p.add_argument(
        "--ephemeral-key-dir",
        type=Path,
        default=Path("/run/setsuna-key"),
        help="where a build-only key lives when no publisher key is given (a tmpfs)",
    )
    p.add_argument("--state-dir", type=Path, default=STATE_DIR)
    p.add_argument(
        "--outcomes-db",
        default="",
        help="postgresql:// URL shared by the replicas (default: SQLite under --state-dir)",
    )
    args, build_args = p.parse_known_args(argv)
    try:
        return build(
            args.out,
            build_args=build_args,
            signing_key=args.signing_key,
            ephemeral_key_dir=args.ephemeral_key_dir,
            state_dir=args.state_dir,
            outcomes_db=args.outcomes_db or None,
        )
    except SetsunaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
