"""Curating a folder of existing images: the domain's filters and annotators only.

``chatroom curate DIR -o OUT`` is a run whose images come from a folder instead of a
generator. It is the engine itself, with the first three stages replaced: the folder
is read as the run's references, item ``i`` is the ``i``-th usable image (sorted by
name), and each item's "generation" loads that image. Filters, annotators, the
journal, records and resuming are the engine's own, so the output folder has the
layout of a run and a killed curate resumes like one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .engine import Engine, RunSummary, Work
from .models import (
    AttributeBank,
    BankEntry,
    Candidate,
    GenerationSettings,
    PlanItem,
    PromptSpec,
    Reference,
)
from .plan import item_id
from .references import load_image
from .resolve import Request

log = logging.getLogger(__name__)

# The stages whose work the folder does; their settings are resolved but not used.
REPLACED = ("extractor", "prompter", "generator")
SOURCE = "curate"


class CurateEngine(Engine):
    """The engine over a folder of images: every image once, filtered and annotated."""

    kind = "curate"

    def __init__(self, request: Request, **kwargs):
        super().__init__(request, **kwargs)
        resolved = self.resolved
        for stage in REPLACED:
            resolved.components[stage] = []
            for key in [k for k in resolved.flat if k.split(".")[0] == stage]:
                del resolved.flat[key]
                resolved.sources.pop(key, None)
        # a curate and a run of the same folder are different runs
        resolved.flat[SOURCE] = True
        resolved.sources[SOURCE] = SOURCE

    def _run(self, references: list[Reference], started: float) -> RunSummary:
        # every usable image once: the target and the budget are the image count
        count = len(references)
        self.settings.count = self.settings.max_candidates = count
        for key in ("count", "max_candidates"):
            self.resolved.flat[key] = count
            self.resolved.sources[key] = f"{SOURCE} (images in the folder)"
        return super()._run(references, started)

    def _summary(self, status: str, started: float) -> RunSummary:
        # rejections are the point of curating: a finished pass is complete
        if status == "budget exhausted":
            status = "complete"
        return super()._summary(status, started)

    def _bank(self, references: list[Reference]) -> AttributeBank:
        """One entry per image, naming its file: the lineage of each record."""
        entries = [
            BankEntry(attribute="image", value=Path(r.path).name, reference=r.id)
            for r in references
        ]
        return AttributeBank(
            domain=self.domain.name,
            attributes=["image"],
            entries=entries,
            extractor=SOURCE,
        )

    def _plan(self, index: int) -> PlanItem:
        return PlanItem(
            index=index,
            item_id=item_id(self.fingerprint, index),
            seed=0,
            entries=[self.bank.entries[index]],
        )

    def _prompt_all(self, indices) -> list[PromptSpec]:
        specs = []
        for index in indices:
            plan = self._plan(index)
            spec = PromptSpec(
                index=index,
                item_id=plan.item_id,
                prompt="",
                negative_prompt="",
                entries=plan.entries,
                writer=SOURCE,
            )
            self.prompts[index] = spec
            specs.append(spec)
        return specs

    def _stage_generate(self, batch: list[Work]) -> None:
        for work in batch:
            reference = self.references[work.plan.entries[0].reference]
            loading = time.monotonic()
            try:
                image = load_image(reference.path)
            except (OSError, ValueError) as exc:  # changed since it was scanned
                work.decide("failed", "generate", SOURCE, f"cannot read image: {exc}")
                continue
            settings = GenerationSettings(
                model=reference.path,
                sampler="",
                steps=0,
                cfg_scale=0.0,
                width=image.width,
                height=image.height,
                seed=0,
            )
            work.candidate = Candidate(
                index=work.index,
                item_id=work.plan.item_id,
                spec=work.spec,
                settings=settings,
                image=image,
                timings={"load": round(time.monotonic() - loading, 4)},
            )


def curate(
    folder: str | Path,
    output: str | Path,
    domain: str | None = None,
    profile: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    fresh: bool = False,
    **kwargs,
) -> RunSummary:
    """Filter and annotate the images of ``folder`` into the run folder ``output``."""
    return curate_engine(
        folder, output, domain, profile, config_path, overrides, fresh, **kwargs
    ).run()


def curate_engine(
    folder,
    output,
    domain=None,
    profile=None,
    config_path=None,
    overrides=None,
    fresh=False,
    **kwargs,
) -> CurateEngine:
    flags = {
        "references": str(folder),
        "output": str(output),
        "domain": domain,
        "profile": profile,
    }
    request = Request(config_path=config_path, flags=flags, overrides=overrides or [])
    return CurateEngine(request, fresh=fresh, **kwargs)


def curate_with_display(folder, output, domain, profile, config_path, overrides, fresh):
    """``chatroom curate``: the engine's live counts on a terminal, then a summary."""
    from .console import stderr
    from .runview import _print_summary, _table

    console = stderr()
    args = (folder, output, domain, profile, config_path, list(overrides), fresh)
    if console.is_terminal:
        from rich.live import Live

        with Live(console=console, refresh_per_second=4, transient=False) as live:
            engine = curate_engine(*args, on_progress=lambda p: live.update(_table(p)))
            summary = engine.run()
            live.update(_table(engine.progress))
    else:
        summary = curate_engine(*args).run()
    _print_summary(summary)
    return summary
