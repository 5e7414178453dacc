"""A binary person mask from MediaPipe's selfie segmentation (offline, CPU).

The paper's part masks come from Graphonomy human parsing; this annotator gives the
binary mask of the whole person (``masks/<id>/person.png``, 255 on the person) with
weights that ship inside the ``mediapipe`` wheel.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from chatroom.components import Annotator, Options
from chatroom.errors import MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation

EXTRA = "offline"


class PersonMaskOptions(Options):
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="A pixel belongs to the person when the model's score is above.",
    )
    model_selection: Literal[0, 1] = Field(
        0,
        description="0: the general model (256x256, portrait photos); 1: the "
        "landscape model (144x256).",
    )
    min_share: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Reject the image when the mask covers less of it than this.",
    )


class PersonMask(Annotator):
    name = "person_mask"
    description = "binary person mask (MediaPipe selfie segmentation)"
    Options = PersonMaskOptions
    requires = (("mediapipe", "chatroom[offline]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        self._segmenter = None

    def _load(self):
        if self._segmenter is None:
            try:
                import mediapipe as mp
            except ImportError:
                raise MissingDependency("mediapipe", EXTRA, self.name) from None
            self._segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(
                model_selection=self.options.model_selection
            )
        return self._segmenter

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Annotation:
        import numpy as np
        from PIL import Image

        if image is None:
            return Annotation(rejected="no image")
        found = self._load().process(np.asarray(image.convert("RGB")))
        scores = found.segmentation_mask
        if scores is None:
            return Annotation(rejected="person mask is empty")
        person = scores > self.options.threshold
        share = float(person.mean())
        if share < self.options.min_share:
            return Annotation(
                rejected="person mask is empty", qa={"person_share": round(share, 4)}
            )
        mask = Image.fromarray(person.astype(np.uint8) * 255)
        return Annotation(masks={"person": mask}, qa={"person_share": round(share, 4)})

    def describe(self):
        kind = ("general", "landscape")[self.options.model_selection]
        return {"model": f"mediapipe selfie segmentation ({kind})"}

    def close(self) -> None:
        if self._segmenter is not None:
            self._segmenter.close()
            self._segmenter = None


@hookimpl
def register_annotators(register):
    register(PersonMask)
