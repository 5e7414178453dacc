"""Base classes for the five stages and the validation of component options."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

if TYPE_CHECKING:
    from .domain import Domain
    from .models import (
        Annotation,
        AttributeBank,
        Candidate,
        PlanItem,
        PromptSpec,
        Reference,
        Verdict,
    )

log = logging.getLogger(__name__)

STAGES = ("extractor", "prompter", "generator", "filter", "annotator")


class Options(BaseModel):
    """Base for a component's options: unknown names are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Context:
    """What a component may use besides its options: the run's shared services."""

    def __init__(self, domain: Domain, cache=None, workdir=None, seed: int = 0):
        self.domain = domain
        self.cache = cache
        self.workdir = workdir
        self.seed = seed


class Component:
    """A named, configurable piece of one stage.

    Subclasses set ``name``, ``stage`` (through the stage base classes below) and
    ``Options``; the engine builds them with validated options and calls ``close``
    when the run ends. Models are loaded lazily, on first use.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    description: ClassVar[str] = ""
    # (import name, what to pip install) for each optional library; `chatroom doctor`
    # checks them without importing.
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, options: Options, context: Context):
        self.options = options
        self.context = context

    def describe(self) -> dict[str, Any]:
        """Model ids, versions and hashes this component used, for run.json."""
        return {}

    def usage(self) -> dict[str, float]:
        """Counters for run.json and the summary, e.g. tokens, calls, estimated cost."""
        return {}

    def close(self) -> None:
        """Release models and connections."""


class ItemFailed:
    """Returned by a stage in place of one item's result: that item failed, why.

    The engine records the reason in failures.jsonl and goes on with the others;
    over-generation replaces the item. Raise a ``ChatroomError`` instead to stop the
    whole run (a quota used up, a missing library).
    """

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"ItemFailed({self.reason!r})"


class Extractor(Component):
    stage = "extractor"

    def extract(
        self, references: list[Reference], domain: Domain
    ) -> AttributeBank:  # pragma: no cover - interface
        raise NotImplementedError


class Prompter(Component):
    stage = "prompter"

    def write(
        self, items: list[PlanItem], domain: Domain
    ) -> list[PromptSpec | ItemFailed]:  # pragma: no cover
        """One prompt per item, in order; an ``ItemFailed`` for an item that failed."""
        raise NotImplementedError


class Generator(Component):
    stage = "generator"

    def generate(
        self, specs: list[PromptSpec], seeds: list[int]
    ) -> list[Candidate | ItemFailed]:
        """One candidate per spec, in order; an ``ItemFailed`` for one that failed."""
        raise NotImplementedError  # pragma: no cover


class Filter(Component):
    """Judges candidates. ``cost`` orders filters: cheapest run first."""

    stage = "filter"
    cost: ClassVar[float] = 1.0

    def check(self, candidates: list[Candidate]) -> list[Verdict]:
        raise NotImplementedError  # pragma: no cover


class Annotator(Component):
    stage = "annotator"

    def annotate(
        self, candidates: list[Candidate], verdicts: list[list[Verdict]]
    ) -> list[Annotation]:  # pragma: no cover
        raise NotImplementedError


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest choice, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _accepted(model: type[BaseModel], field: str) -> str:
    info = model.model_fields.get(field)
    if info is None:
        return ""
    ann = info.annotation
    args = getattr(ann, "__args__", None)
    if args and all(isinstance(a, str) for a in args):
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a table of options"
    plain = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
    if ann in plain:
        return plain[ann]
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    return f"a {name}"


def validate_options(
    component: type[Component],
    where: str,
    raw: dict,
    source: Callable[[str], str | None] | None = None,
) -> Options:
    """Build a component's options, turning pydantic errors into one clear line.

    ``source(option)`` may name where a value was set (a config file, ``--set``);
    the message then says so.
    """
    model = component.Options
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        option = str(err["loc"][0]) if err["loc"] else ""
        origin = source(loc) if source and loc else None
        note = f" (set in {origin})" if origin else ""
        if err["type"] == "extra_forbidden":
            known = sorted(model.model_fields)
            hint = closest(option, known) or f" (known: {', '.join(known) or 'none'})"
            raise ConfigError(
                f"{where} ({component.name}): unknown option '{loc}'{hint}{note}"
            ) from None
        value = err.get("input")
        # A nested option (hires.steps) has its own rule in the message already.
        accepted = _accepted(model, option) if len(err["loc"]) == 1 else ""
        msg = err["msg"][0].lower() + err["msg"][1:]
        tail = f"; expected {accepted}" if accepted else ""
        raise ConfigError(
            f"{where} ({component.name}): option '{loc}' = {value!r}: {msg}{tail}{note}"
        ) from None
