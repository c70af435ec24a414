"""The container target's ``tritonserver`` command, from the same settings as ``make serve``.

``docker-compose.yml`` spells the command out (so it reads as a normal
compose file), and a test checks that it equals :func:`container_command` of
the default :class:`~setsuna.server.ServerSettings`: one source for both
targets, with only what must differ inside a container changed here:

- it listens on every interface *inside* the container (the compose file
  publishes the ports on the host's 127.0.0.1 only);
- it loads every model of its repository (``--load-model=*``): the whole
  stack the image was built with (:data:`CONTAINER_REPOSITORY`), or, for the
  GPU service, the mounted GPU variant (:data:`GPU_REPOSITORY`);
- the admin token comes from the host's environment at ``up`` time, never
  from the file;
- ``--http-max-input-size`` is left out: the pinned 24.10 image (server
  2.51.0, the wheel's version) does not know it;
- HTTP stays on (the local target turns it off): the image's healthcheck
  and a cluster's probes use ``/v2/health/ready``. Its 2.51 frontend can be
  crashed by one request, so the port is published on the host's loopback
  only and ``restart: unless-stopped`` brings a crashed server back; see the
  threat model in docs/architecture.md.

``python -m setsuna.compose`` prints the command as YAML list items
(``--gpu``: the ``triton-gpu`` service's, docker-compose.gpu.yml).
"""

from __future__ import annotations

import sys
from pathlib import Path

from setsuna.server import ADMIN_TOKEN_ENV, ServerSettings

#: The image's writable state (docker-compose.yml's ``setsuna-state`` volume): the
#: model repository, shadow logs, outcomes DB, and the lifecycle's state folder beside
#: the repository (``.models.state``), on one file system so retiring is a rename.
STATE_DIR = "/var/lib/setsuna"
#: Where deploy/container/Dockerfile puts the repository it builds (the whole stack).
CONTAINER_REPOSITORY = f"{STATE_DIR}/models"
#: Where docker-compose.gpu.yml mounts model_repository/container-gpu (read-only).
GPU_REPOSITORY = "/models-gpu"
#: NGC release whose server is 2.51.0, the version of the nvidia-pytriton binary; the
#: Dockerfile starts FROM it.
BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: setsuna's image (deploy/container/Dockerfile): BASE_IMAGE with the SDK and the
#: repository built inside it. Its own name: compose tags what it builds with the
#: service's ``image:``, which must never be the base's.
IMAGE = "setsuna/tritonserver:24.10-py3"
#: Compose interpolation that fails `up` when the token is unset.
TOKEN_REFERENCE = f"${{{ADMIN_TOKEN_ENV}?{ADMIN_TOKEN_ENV}_must_be_set}}"


def container_settings(anchor: Path = Path()) -> ServerSettings:
    """Default settings as the container needs them (``anchor`` only satisfies validation)."""
    return ServerSettings(
        anchor, bind_address="0.0.0.0", allow_remote_bind=True, http=True, load_models=()
    )


def container_command(
    settings: ServerSettings | None = None, repository: str = CONTAINER_REPOSITORY
) -> list[str]:
    """argv of ``tritonserver`` in the container, serving ``repository``."""
    s = settings or container_settings()
    return [
        "tritonserver",
        f"--model-repository={repository}",
        "--load-model=*",
        *s.flags(token=TOKEN_REFERENCE, max_input_size_flag=False),
    ]


def gpu_command(settings: ServerSettings | None = None) -> list[str]:
    """argv of the ``triton-gpu`` service (docker-compose.gpu.yml): the GPU repository."""
    return container_command(settings, GPU_REPOSITORY)


def main(argv: list[str] | None = None) -> int:
    gpu = "--gpu" in (sys.argv[1:] if argv is None else argv)
    for arg in gpu_command() if gpu else container_command():
        print(f"      - {arg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
