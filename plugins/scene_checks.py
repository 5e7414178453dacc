"""No people in frame: a filter for scenes that should show only buildings or rooms.

The people are found by the pose plugin's BlazePose person finder (MediaPipe, weights
inside the ``mediapipe`` wheel), the same one the fashion pack uses to keep exactly
one person; here any person it finds rejects the image. Every verdict records how
many people were found and the height of the tallest, as a share of the frame.

BlazePose finds people who are reasonably large in the frame; a crowd of small,
distant figures may pass (see the limitation in docs/domains.md).
"""

from __future__ import annotations

from pydantic import Field

from chatroom.components import Options
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict
from chatroom.plugins.pose import PeopleFilter, visible_height


class NoPeopleOptions(Options):
    min_height: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="People whose visible joints span less than this share of the "
        "frame height are ignored (0: anyone found rejects the image).",
    )
    min_confidence: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="A joint counts when inside the frame with a BlazePose "
        "visibility above this.",
    )
    max_people: int = Field(
        4, ge=1, le=16, description="Stop looking for people after this many."
    )


def decide_no_people(
    people, width: int, height: int, options: NoPeopleOptions
) -> tuple[str, dict[str, float]]:
    """The reason to reject ('' to keep) and the scores, from every person found."""
    heights = [
        visible_height(person, width, height, options.min_confidence) / height
        for person in people
    ]
    counted = [h for h in heights if h > 0 and h >= options.min_height]
    scores = {
        "detected": float(len(people)),
        "people": float(len(counted)),
        "tallest": round(max(heights, default=0.0), 4),
    }
    if not counted:
        return "", scores
    return ("person in frame" if len(counted) == 1 else "people in frame"), scores


class NoPeopleFilter(PeopleFilter):
    name = "no_people"
    description = "rejects images with a person in them (BlazePose)"
    Options = NoPeopleOptions

    def judge(self, image, people) -> Verdict:
        reason, scores = decide_no_people(
            people, image.width, image.height, self.options
        )
        return Verdict(passed=not reason, reason=reason, scores=scores)


@hookimpl
def register_filters(register):
    register(NoPeopleFilter)
