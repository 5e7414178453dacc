"""No-reference image quality (BRISQUE; lower is better) for records and references.

brisque 0.2 builds its feature vector as an object array whose entries are sometimes
one-element arrays; numpy 2.4 refuses ``float()`` on those. ``_Brisque`` flattens
each feature to a plain float before scaling, which is all the fix needs.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

from .load import RunData

log = logging.getLogger(__name__)

MAX_SIDE = 512  # images are scored at this size at most, so scores are comparable


def _scorer():
    from brisque import BRISQUE

    class _Brisque(BRISQUE):
        def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
            features = super().calculate_brisque_features(image, kernel_size, sigma)
            return np.array(
                [float(np.asarray(f, dtype=float).reshape(-1)[0]) for f in features]
            )

    return _Brisque(url=False)


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((MAX_SIDE, MAX_SIDE))
        return np.asarray(img)


def quality(run: RunData, sample: int = 200) -> dict[str, Any]:
    """BRISQUE scores of up to ``sample`` records and every reference."""
    try:
        scorer = _scorer()
    except ImportError as exc:
        return {
            "available": False,
            "note": f"BRISQUE needs the report extra ({exc.name} is missing)",
        }
    records = [run.out / row["file_name"] for row in run.records]
    sampled = len(records) > sample
    if sampled:
        records = random.Random(0).sample(records, sample)
    references = [Path(ref["path"]) for ref in run.references if ref.get("path")]
    scores = {
        "generated": _score_all(scorer, records),
        "reference": _score_all(scorer, references),
    }
    return {
        "available": True,
        "metric": "BRISQUE (lower is better)",
        "note": f"a random sample of {sample} records" if sampled else "",
        "scores": scores,
        "mean": {
            kind: (sum(values) / len(values) if values else None)
            for kind, values in scores.items()
        },
    }


def _score_all(scorer, paths: list[Path]) -> list[float]:
    scores = []
    for path in paths:
        try:
            value = float(scorer.score(_pixels(path)))
        except Exception as exc:  # flat or tiny images make the fit fail
            log.info("%s: no BRISQUE score: %s", path, exc)
            continue
        if np.isfinite(value):
            scores.append(value)
    return scores
