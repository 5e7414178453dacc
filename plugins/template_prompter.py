"""An offline prompter: the domain pack's dynamicprompts template, filled per item.

Each attribute of the plan becomes a dynamicprompts variable (``${garment}``), the
pack's wildcard lists (``__light__``) and variants (``{a|b}``) add variety, and the
item's seed makes the choice reproducible. Every prompt names the bank entries it
was built from. An item without entries (attribute extraction turned off) takes each
attribute from the pack's wildcard file of the same name (``garment.txt``) where
there is one; the other attribute slots are dropped.
"""

from __future__ import annotations

import re

from pydantic import Field

from chatroom.components import Options, Prompter
from chatroom.errors import ConfigError
from chatroom.hookspecs import hookimpl
from chatroom.models import PlanItem, PromptSpec

# Characters with a meaning in dynamicprompts or WebUI prompt syntax.
SYNTAX = re.compile(r"[{}|$_\[\]()<>:\\]")


class TemplateOptions(Options):
    template: str = Field("", description="Overrides the pack's template when set.")
    negative_prompt: str = Field(
        "", description="Overrides the pack's negative prompt."
    )
    max_value_words: int = Field(
        8, ge=1, description="Attribute values are cut to this."
    )


def clean_value(text: str, max_words: int) -> str:
    """An attribute value made safe to put inside a template."""
    words = SYNTAX.sub(" ", text).replace(",", " ").split()
    return " ".join(words[:max_words])


# dynamicprompts needs a value for every variable; a missing attribute gets this word,
# which ``tidy`` removes again.
EMPTY = "EMPTYATTRIBUTE"
EMPTY_WEIGHT = re.compile(r"^[(\[]\s*(:\s*[\d.]+)?\s*[)\]]$")


def tidy(prompt: str) -> str:
    """Remove the slots that missing attributes leave behind."""
    parts = [" ".join(p.replace(EMPTY, " ").split()) for p in prompt.split(",")]
    return ", ".join(p for p in parts if p and not EMPTY_WEIGHT.match(p))


class TemplatePrompter(Prompter):
    name = "template"
    description = "dynamicprompts template from the domain pack, filled per item"
    Options = TemplateOptions

    def __init__(self, options, context):
        super().__init__(options, context)
        self._generator = None

    def _dynamic(self):
        if self._generator is None:
            from dynamicprompts.generators import RandomPromptGenerator
            from dynamicprompts.wildcards import WildcardManager

            manager = WildcardManager(self.context.domain.wildcards_dir)
            self._generator = RandomPromptGenerator(wildcard_manager=manager)
        return self._generator

    def write(self, items: list[PlanItem], domain) -> list[PromptSpec]:
        template = self.options.template or domain.prompt_template
        negative = self.options.negative_prompt or domain.negative_prompt
        names = {q.name for q in domain.attributes}
        out = []
        for item in items:
            values = dict.fromkeys(names, EMPTY)
            if not item.entries:  # no bank (extraction off): the pack's wildcards
                values.update(self._wildcard_values(names, domain))
            for entry in item.entries:
                value = clean_value(entry.value, self.options.max_value_words)
                values[entry.attribute] = value or EMPTY
            header = "".join(f"${{{k}={v}}}" for k, v in sorted(values.items()))
            try:
                text = self._dynamic().generate(
                    header + template, 1, seeds=[item.seed]
                )[0]
            except Exception as exc:
                raise ConfigError(
                    f"prompter (template): the template fails: {exc}"
                ) from None
            if "__" in text:
                left = re.findall(r"__[\w/-]+__", text)
                raise ConfigError(
                    f"prompter (template): wildcard {left[0] if left else '__?__'} "
                    f"has no file in {domain.wildcards_dir}"
                )
            out.append(
                PromptSpec(
                    index=item.index,
                    item_id=item.item_id,
                    prompt=tidy(text),
                    negative_prompt=negative,
                    entries=item.entries,
                    writer=self.name,
                )
            )
        return out

    @staticmethod
    def _wildcard_values(names: set[str], domain) -> dict[str, str]:
        """``__garment__`` for each attribute with a wildcard file of its own."""
        folder = domain.wildcards_dir
        return {n: f"__{n}__" for n in names if (folder / f"{n}.txt").is_file()}


@hookimpl
def register_prompters(register):
    register(TemplatePrompter)
