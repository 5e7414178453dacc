"""Checks the binary masks another annotator makes; drops the broken ones.

An annotator sees the candidates and the filters' verdicts, not the other
annotators' masks, so ``mask_check`` runs the mask annotator itself: name it in
``annotator`` (with its options in ``annotator_options``) and use ``mask_check`` in
its place. Every mask it returns is checked for

- holes: background regions the mask encloses (not connected to the image border)
  of at least ``min_hole_area`` of the mask's area. With the image at hand, an
  enclosed region whose mean colour is nearer the background just outside the mask
  than the mask around it is background seen through the body (a hand on the hip,
  feet together) and is not a hole;
- fragments: connected pieces besides the largest, of at least
  ``min_fragment_area`` of the mask's area.

A mask that fails is dropped (not written) and the reason goes into the record's QA
under ``mask_check``; when every mask fails, the item is rejected (unless
``reject_when_empty`` is off). The check is deterministic: plain connected
components, 8-connected for the mask and 4-connected for the background.

With ``vlm_model`` (a local BLIP-2 folder) a mask that passes is also shown to
BLIP-2, the picture greyed outside the mask, with the paper's question whether it
shows the part (``vlm_question``); an answer starting with "no" drops the mask. An
unusable answer keeps it, with the answer recorded.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from chatroom.components import Annotator, Options, validate_options
from chatroom.errors import MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation

log = logging.getLogger(__name__)

EXTRA = "checks"


def _label(binary, full: bool):
    try:
        from scipy import ndimage
    except ImportError:
        raise MissingDependency("scipy", EXTRA, "mask_check") from None
    structure = ndimage.generate_binary_structure(2, 2 if full else 1)
    return ndimage.label(binary, structure=structure)


def mask_problems(
    mask,
    min_hole_area: float = 0.005,
    min_fragment_area: float = 0.005,
    image=None,
) -> tuple[list[str], dict[str, float]]:
    """What is wrong with a binary mask: (reasons, measures).

    ``mask`` is a PIL image or an array; non-zero pixels belong to the mask. Areas
    are shares of the mask's own area. With ``image`` (the same size), enclosed
    regions coloured like the background are gaps, not holes.
    """
    import numpy as np

    binary = np.asarray(mask) > 0
    if binary.ndim == 3:
        binary = binary.any(axis=-1)
    area = int(binary.sum())
    if area == 0:
        return ["empty"], {"area": 0.0}

    # fragments: connected pieces of the mask other than the largest
    pieces, count = _label(binary, full=True)
    sizes = np.bincount(pieces.ravel())[1:]
    others = np.sort(sizes)[::-1][1:] / area
    fragments = others[others >= min_fragment_area]

    # holes: background regions that do not touch the image border
    background, _ = _label(~binary, full=False)
    border = np.unique(
        np.concatenate(
            [background[0], background[-1], background[:, 0], background[:, -1]]
        )
    )
    sizes = np.bincount(background.ravel())
    sizes[0] = 0
    sizes[border] = 0
    enclosed = [int(n) for n in np.flatnonzero(sizes >= min_hole_area * area)]
    gaps = _gaps(binary, background, border, enclosed, image) if enclosed else set()
    hole_shares = sizes[sizes > 0] / area
    holes = np.array([sizes[n] / area for n in enclosed if n not in gaps])

    reasons = []
    if len(holes):
        reasons.append(f"{len(holes)} hole(s), largest {holes.max():.1%} of the mask")
    if len(fragments):
        reasons.append(
            f"{len(fragments)} fragment(s), largest {fragments.max():.1%} of the mask"
        )
    measures = {
        "area": float(area),
        "pieces": float(count),
        "largest_hole": round(float(hole_shares.max()) if len(hole_shares) else 0.0, 4),
        "largest_fragment": round(float(others.max()) if len(others) else 0.0, 4),
        "gaps": float(len(gaps)),
    }
    return reasons, measures


def _gaps(binary, background, border, enclosed, image) -> set[int]:
    """The enclosed regions whose colour is the background's, not the mask's."""
    import numpy as np
    from scipy import ndimage

    if image is None:
        return set()
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if pixels.shape[:2] != binary.shape:
        return set()
    pixels = pixels.astype(np.float32)
    reach = max(3, int(0.02 * min(binary.shape)))
    outside = (
        ndimage.binary_dilation(binary, iterations=reach)
        & ~binary
        & np.isin(background, border)
    )
    if not outside.any():
        return set()
    backdrop = pixels[outside].mean(axis=0)
    gaps = set()
    for label in enclosed:
        region = background == label
        around = ndimage.binary_dilation(region, iterations=reach) & binary
        colour = pixels[region].mean(axis=0)
        to_mask = np.linalg.norm(colour - pixels[around].mean(axis=0))
        if np.linalg.norm(colour - backdrop) < to_mask:
            gaps.add(label)
    return gaps


class MaskCheckOptions(Options):
    annotator: str = Field(
        "person_mask", description="The annotator whose masks are checked."
    )
    annotator_options: dict[str, Any] = Field(
        default_factory=dict, description="Options for that annotator."
    )
    min_hole_area: float = Field(
        0.005,
        gt=0,
        lt=1,
        description="A hole counts when it is at least this share of the mask's area.",
    )
    min_fragment_area: float = Field(
        0.005,
        gt=0,
        lt=1,
        description="A piece besides the largest counts when it is at least this "
        "share of the mask's area.",
    )
    reject_when_empty: bool = Field(
        True, description="Reject the item when every mask fails the check."
    )
    vlm_model: str | None = Field(
        None,
        description="Local BLIP-2 folder: also ask it whether each masked picture "
        "shows its part.",
    )
    vlm_question: str = Field(
        "Does the picture show {part}?",
        description="The question; {part} is the mask's name from part_names.",
    )
    part_names: dict[str, str] = Field(
        default_factory=lambda: {"person": "a person"},
        description="Mask name -> words for the question (default: the name).",
    )
    vlm_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for BLIP-2."
    )


class MaskCheck(Annotator):
    name = "mask_check"
    description = "runs a mask annotator and drops masks with holes or fragments"
    Options = MaskCheckOptions
    requires = (("scipy", "chatroom[checks]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        self.inner = self._build(options, context)
        self.questions = _questions(options) if options.vlm_model else None
        self.checked = 0
        self.dropped = 0

    @staticmethod
    def _build(options, context):
        from chatroom.manager import Plugins

        cls = Plugins().component("annotator", options.annotator)
        where = f"annotators (mask_check -> {options.annotator})"
        inner_options = validate_options(cls, where, options.annotator_options)
        return cls(inner_options, context)

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        notes = self.inner.annotate(candidates, verdicts)
        return [
            self.check(note, candidate.image)
            for note, candidate in zip(notes, candidates, strict=True)
        ]

    def check(self, note: Annotation, image=None) -> Annotation:
        """The annotation with its failing masks dropped and the reasons in QA."""
        if note.rejected or not note.masks:
            return note
        options = self.options
        kept, failed = {}, {}
        for part, mask in note.masks.items():
            self.checked += 1
            reasons, _ = mask_problems(
                mask, options.min_hole_area, options.min_fragment_area, image
            )
            if reasons:
                failed[part] = "; ".join(reasons)
                self.dropped += 1
            else:
                kept[part] = mask
        answers = self._ask(kept, image) if self.questions and image else {}
        for part, answer in answers.items():
            if answer.lower().startswith("no"):
                failed[part] = f"BLIP-2 answered {answer!r}"
                del kept[part]
                self.dropped += 1
        if not failed:
            if answers:
                note = note.model_copy(update={"qa": {**note.qa, "mask_vlm": answers}})
            return note
        qa = {**note.qa, "mask_check": failed}
        if answers:
            qa["mask_vlm"] = answers
        note = note.model_copy(update={"masks": kept, "qa": qa})
        if not kept and options.reject_when_empty:
            first, reason = next(iter(failed.items()))
            note.rejected = f"mask check: {first}: {reason}"
        return note

    def _ask(self, masks: dict, image) -> dict[str, str]:
        """BLIP-2's answer for each mask, asked of the picture greyed outside it."""
        from PIL import Image

        answers = {}
        grey = Image.new("RGB", image.size, (128, 128, 128))
        for part, mask in masks.items():
            shown = Image.composite(image.convert("RGB"), grey, mask.convert("L"))
            words = self.options.part_names.get(part, part.replace("_", " "))
            question = self.options.vlm_question.format(part=words)
            [answer] = self.questions.ask([shown], question)
            answers[part] = answer.text or f"(no usable answer: {answer.problem})"
        return answers

    def describe(self):
        out = {"annotator": self.options.annotator, **self.inner.describe()}
        if self.questions is not None:
            out["vlm"] = self.options.vlm_model
        return out

    def usage(self):
        return {"masks": float(self.checked), "dropped": float(self.dropped)}

    def close(self) -> None:
        self.inner.close()
        if self.questions is not None:
            self.questions.close()


def _questions(options: MaskCheckOptions):
    """A BLIP-2 asker (plugins/blip2.py) for the yes/no question."""
    from chatroom.plugins.blip2 import Blip2Asker, Blip2Options

    class MaskQuestions(Blip2Asker):
        name = "mask_check"
        stage = "annotator"

        def __init__(self):
            self.options = Blip2Options(
                model=options.vlm_model,
                device=options.vlm_device,
                max_new_tokens=5,
                batch_size=1,
            )
            self._setup()

    return MaskQuestions()


@hookimpl
def register_annotators(register):
    register(MaskCheck)
