"""A plugin that implements ``register_widgets``, a hook chatroom has no spec for."""

from chatroom.hookspecs import hookimpl


@hookimpl
def register_widgets(register):
    register(object)
