"""The architecture domain: the pack beside this module, registered as a plugin."""

from pathlib import Path

from chatroom.hookspecs import hookimpl

PACK = Path(__file__).parent


@hookimpl
def register_domains(register):
    register(PACK)
