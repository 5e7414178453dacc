"""An extractor with no model: the attribute bank comes from the config or a file.

With ``values``, every reference gets the listed values of each attribute in turn;
with ``file``, a JSONL file of ``{reference, attribute, value}`` rows is read.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from chatroom.components import Extractor, Options
from chatroom.errors import ConfigError
from chatroom.hookspecs import hookimpl
from chatroom.models import AttributeBank, BankEntry
from chatroom.store import read_jsonl


class StaticOptions(Options):
    values: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Attribute name -> values, spread over the references in turn.",
    )
    file: str = Field("", description="A JSONL bank: reference, attribute, value rows.")


class StaticExtractor(Extractor):
    name = "static"
    description = "attribute bank from the config or a JSONL file, no model"
    Options = StaticOptions

    def __init__(self, options, context):
        super().__init__(options, context)
        if not options.values and not options.file:
            raise ConfigError(
                "extractor (static): set extractor.values (attribute -> list of "
                "values) or extractor.file (a JSONL bank)"
            )

    def extract(self, references, domain) -> AttributeBank:
        entries: list[BankEntry] = []
        if self.options.file:
            path = Path(self.options.file).expanduser()
            try:
                rows = read_jsonl(path)
                entries = [BankEntry.model_validate(r) for r in rows]
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"extractor.file: {path}: {str(exc).splitlines()[0]}"
                ) from None
        for attribute, values in self.options.values.items():
            for number, reference in enumerate(references):
                if values:
                    value = values[number % len(values)]
                    entries.append(
                        BankEntry(
                            attribute=attribute, value=value, reference=reference.id
                        )
                    )
        attributes = list(dict.fromkeys(e.attribute for e in entries))
        return AttributeBank(domain=domain.name, attributes=attributes, entries=entries)


@hookimpl
def register_extractors(register):
    register(StaticExtractor)
