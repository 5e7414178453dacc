"""The architecture domain: the pack beside this module and architecture-only components."""

from pathlib import Path

from chatroom.hookspecs import hookimpl

PACK = Path(__file__).parent


@hookimpl
def register_domains(register):
    register(PACK)
