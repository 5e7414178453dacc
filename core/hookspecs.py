"""The hooks a chatroom plugin may implement.

Registration hooks are called once when the plugin manager starts; each receives a
``register`` callable and offers components (or domain packs) through it. Lifecycle
hooks are called by the engine while a run goes on and receive keyword arguments.
"""

import pluggy

hookspec = pluggy.HookspecMarker("chatroom")
hookimpl = pluggy.HookimplMarker("chatroom")


# --- registration --------------------------------------------------------------


@hookspec
def register_extractors(register):
    """Offer extractors: ``register(cls)`` with a ``chatroom.Extractor`` subclass."""


@hookspec
def register_prompters(register):
    """Offer prompters: ``register(cls)`` with a ``chatroom.Prompter`` subclass."""


@hookspec
def register_generators(register):
    """Offer generators: ``register(cls)`` with a ``chatroom.Generator`` subclass."""


@hookspec
def register_filters(register):
    """Offer filters: ``register(cls)`` with a ``chatroom.Filter`` subclass."""


@hookspec
def register_annotators(register):
    """Offer annotators: ``register(cls)`` with a ``chatroom.Annotator`` subclass."""


@hookspec
def register_domains(register):
    """Offer domain packs: ``register(path)`` with the folder holding ``pack.toml``."""


# --- lifecycle -----------------------------------------------------------------


@hookspec
def run_started(run):
    """Called once the config is resolved and the output folder is ready.

    ``run`` is the ``chatroom.engine.RunContext`` (config, domain, output folder).
    """


@hookspec
def record_written(run, record):
    """Called after a ``Record`` is committed to the journal and its files exist."""


@hookspec
def run_finished(run, summary):
    """Called when a run ends, completed or not; ``summary`` is a ``RunSummary``."""
