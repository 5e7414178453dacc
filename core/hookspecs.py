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
    """Offer extractors: call ``register(cls)`` with each class.

    Each class subclasses ``chatroom.components.Extractor``.
    """


@hookspec
def register_prompters(register):
    """Offer prompters: call ``register(cls)`` with each class.

    Each class subclasses ``chatroom.components.Prompter``.
    """


@hookspec
def register_generators(register):
    """Offer generators: call ``register(cls)`` with each class.

    Each class subclasses ``chatroom.components.Generator``.
    """


@hookspec
def register_filters(register):
    """Offer filters: call ``register(cls)`` with each class.

    Each class subclasses ``chatroom.components.Filter``.
    """


@hookspec
def register_annotators(register):
    """Offer annotators: call ``register(cls)`` with each class.

    Each class subclasses ``chatroom.components.Annotator``.
    """


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
    """Called after a record is committed to the journal and its files exist.

    ``record`` is a ``chatroom.models.Record``.
    """


@hookspec
def run_finished(run, summary):
    """Called when a run ends, completed, out of budget or stopped by an error.

    ``summary`` is a ``chatroom.engine.RunSummary``.
    """
