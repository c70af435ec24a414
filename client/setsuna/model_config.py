"""Read a Triton ``config.pbtxt`` with Triton's own schema, or say what is wrong.

A config that does not parse makes Triton refuse the model with a protobuf
message that names neither the file nor the fix, and only once the server is
already starting. This module parses it the way Triton does (the
``ModelConfig`` message shipped in ``tritonclient.grpc.model_config_pb2``,
``google.protobuf.text_format``) before anything loads it, and raises a
:class:`~setsuna.errors.ConfigError` that names the file, the line and
column, and what to do.

It lives in the SDK because it is a contract every wing shares: the build
writes configs and reads them back through it, the ensembles do the same,
and the server launcher calls :func:`check_repository` to refuse or skip a
model whose config is broken, with the reason, instead of letting Triton
fail it.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from setsuna.errors import ConfigError

CONFIG_NAME = "config.pbtxt"
_FIX = "fix it, or regenerate the model with `make build-engines`"


def parse(
    text: str | bytes, *, origin: str = CONFIG_NAME, name: str | None = None
) -> mc.ModelConfig:
    """Parse config text under Triton's ``ModelConfig`` schema, or raise ConfigError.

    ``origin`` names the file in messages. ``name``, when given, is the model
    folder's name: Triton serves a model under its folder's name, so a config
    that names another model is refused (an empty ``name`` is filled in by
    Triton and accepted here too). An empty file is refused: it is what an
    interrupted write leaves, never a config anyone meant.
    """
    if isinstance(text, bytes):
        text = _decode(text, origin)
    if not _meaningful(text):
        raise ConfigError(
            f"{origin} is empty: a model config names at least its backend or platform and "
            f"its tensors; {_FIX}"
        )
    try:
        cfg = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        where = f"{origin}:{line}:{column}" if line is not None else origin
        detail = str(exc).split(" : ", 1)[-1] if line is not None else str(exc)
        raise ConfigError(
            f"{where}: does not parse under Triton's ModelConfig schema: {detail}. "
            f"Correct that line (field names and types: Triton's model_config.proto), or "
            f"regenerate the model with `make build-engines`"
        ) from exc
    if name is not None and cfg.name and cfg.name != name:
        raise ConfigError(
            f"{origin}: name {cfg.name!r} differs from its folder {name!r}; Triton serves a "
            f"model under its folder's name. Set name: {name!r} or rename the folder"
        )
    return cfg


#: Why :func:`batching_hazards` exists, for messages and docs.
QUEUE_POLICY_STALL = (
    "dynamic batching with a default_queue_policy (a timeout, max_queue_size or "
    "allow_timeout_override) or "
    "priority levels turns payload pre-fetching off in Triton 2.51 (core "
    "scheduler_utils.cc); the batcher is then woken only by a waiting consumer, and a "
    "request arriving between a response and the instance's release sleeps "
    "default_wait_microseconds (500 ms): drop the queue policy and bound overload with "
    "deadlines instead (docs/architecture.md, 'Overload and deadlines')"
)


def batching_hazards(cfg: mc.ModelConfig) -> list[str]:
    """Why ``cfg``'s dynamic batching would stall in Triton 2.51; empty when it would not.

    The builders never write such a config (a test walks every one they
    write); hand-written configs that pin the queue policy's own behaviour
    may, knowingly.
    """
    if not cfg.HasField("dynamic_batching"):
        return []
    db = cfg.dynamic_batching
    policy = db.default_queue_policy
    found = []
    if db.HasField("default_queue_policy") and (
        policy.default_timeout_microseconds
        or policy.max_queue_size
        or policy.allow_timeout_override  # r24.10 scheduler_utils.cc checks it too
    ):
        found.append("default_queue_policy")
    if db.priority_levels or db.priority_queue_policy:
        found.append("priority levels")
    return [f"{cfg.name or 'model'}: {what}: {QUEUE_POLICY_STALL}" for what in found]


def load(path: Path, *, name: str | None = None) -> mc.ModelConfig:
    """Read and :func:`parse` the config file at ``path``.

    ``name`` defaults to the folder holding the file (pass the published name
    when checking a folder that is not yet at its final place).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}; {_FIX}") from exc
    return parse(data, origin=str(path), name=path.parent.name if name is None else name)


def check_repository(path: Path) -> dict[str, str]:
    """``{model: reason}`` for every model folder in ``path`` whose config is unusable.

    Model folders are the subfolders whose name does not start with '.' (the
    ones Triton and :class:`setsuna.server.ServerSettings` see; hidden ones
    are staging folders of a publish in progress). A folder without a
    ``config.pbtxt`` counts as unusable: setsuna always writes one, and
    Triton's auto-completion would guess the rest. An empty dict means every
    model's config parses and names its own folder.
    """
    if not path.is_dir():
        raise ConfigError(f"model repository {path} is not a directory; build it first")
    bad: dict[str, str] = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = folder / CONFIG_NAME
        if not config.is_file():
            bad[folder.name] = f"{config} is missing; {_FIX}"
            continue
        try:
            load(config)
        except ConfigError as exc:
            bad[folder.name] = str(exc)
    return bad


def _decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError(
            f"{origin}:{line}:{column}: byte 0x{data[exc.start]:02x} is not UTF-8 text; the "
            f"file is not a text config (a binary or a damaged copy?); {_FIX}"
        ) from exc


def _meaningful(text: str) -> bool:
    """True if ``text`` holds anything besides whitespace and ``#`` comments."""
    return any(line.split("#", 1)[0].strip() for line in text.splitlines())
