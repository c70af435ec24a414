"""The container target's ``tritonserver`` command, from the same settings as ``make serve``.

``docker-compose.yml`` spells the command out (so it reads as a normal
compose file), and a test checks that it equals :func:`container_command` of
the default :class:`~setsuna.server.ServerSettings`: one source for both
targets, with only what must differ inside a container changed here:

- it listens on every interface *inside* the container (the compose file
  publishes the ports on the host's 127.0.0.1 only);
- it loads every model of the mounted repository (``--load-model=*``);
- the admin token comes from the host's environment at ``up`` time, never
  from the file;
- ``--http-max-input-size`` is left out: the pinned 24.10 image (server
  2.51.0, the wheel's version) does not know it;
- HTTP stays on (the local target turns it off): the image's healthcheck
  and a cluster's probes use ``/v2/health/ready``. Its 2.51 frontend can be
  crashed by one request, so the port is published on the host's loopback
  only and ``restart: unless-stopped`` brings a crashed server back; see the
  threat model in docs/architecture.md.

``python -m setsuna.compose`` prints the command as YAML list items.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setsuna.server import ADMIN_TOKEN_ENV, ServerSettings

#: Where docker-compose.yml mounts model_repository/container.
CONTAINER_REPOSITORY = "/models"
#: NGC release whose server is 2.51.0, the version of the nvidia-pytriton binary.
IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: Compose interpolation that fails `up` when the token is unset.
TOKEN_REFERENCE = f"${{{ADMIN_TOKEN_ENV}?{ADMIN_TOKEN_ENV}_must_be_set}}"


def container_settings(anchor: Path = Path()) -> ServerSettings:
    """Default settings as the container needs them (``anchor`` only satisfies validation)."""
    return ServerSettings(
        anchor, bind_address="0.0.0.0", allow_remote_bind=True, http=True, load_models=()
    )


def container_command(settings: ServerSettings | None = None) -> list[str]:
    """argv of ``tritonserver`` in the NGC container."""
    s = settings or container_settings()
    return [
        "tritonserver",
        f"--model-repository={CONTAINER_REPOSITORY}",
        "--load-model=*",
        *s.flags(token=TOKEN_REFERENCE, max_input_size_flag=False),
    ]


def main() -> int:
    for arg in container_command():
        print(f"      - {arg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
