"""An example third-party filter: rejects images whose mean pixel value is too high.

Installed on its own, it is found through the ``chatroom`` entry-point group and used
by naming it in a config::

    [filters.bright]
    use = "max_brightness"
    max_mean = 180
"""

from chatroom.components import Filter, Options
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict
from pydantic import Field


class MaxBrightnessOptions(Options):
    max_mean: float = Field(
        200.0,
        ge=0,
        le=255,
        description="Reject when the mean pixel value (0-255) is higher.",
    )


class MaxBrightness(Filter):
    name = "max_brightness"
    description = "rejects images whose mean pixel value is above max_mean"
    Options = MaxBrightnessOptions
    cost = 0.05

    def check(self, candidates) -> list[Verdict]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Verdict:
        import numpy as np

        if image is None:
            return Verdict(filter=self.name, passed=False, reason="no image")
        mean = round(float(np.asarray(image, dtype=np.float32).mean()), 2)
        limit = self.options.max_mean
        if mean > limit:
            return Verdict(
                filter=self.name,
                passed=False,
                scores={"mean": mean},
                reason=f"too bright: mean pixel value {mean:.2f} is above {limit:.2f}",
            )
        return Verdict(filter=self.name, passed=True, scores={"mean": mean})


@hookimpl
def register_filters(register):
    register(MaxBrightness)
