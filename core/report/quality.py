"""No-reference image quality of the references, each run and any baseline folder.

BRISQUE (lower is better) is always offline; NIMA (the paper's Table 2: the mean of
the predicted 1-10 rating, higher is better) runs when given a local checkpoint,
through the quality plugin's network. Images are scored at 512 px at most.

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


def quality(
    sources: list[dict[str, Any]],
    sample: int = 200,
    nima: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """BRISQUE, and NIMA given its weights, of up to ``sample`` images a source.

    ``sources`` are dicts with a ``label``, a ``kind`` and the image ``paths``;
    the reference images, each run's records and any baseline folder.
    """
    metrics: dict[str, dict[str, Any]] = {}
    scorers: dict[str, Any] = {}
    try:
        scorers["brisque"] = _scorer()
        metrics["brisque"] = {"available": True, "name": "BRISQUE (lower is better)"}
    except ImportError as exc:
        metrics["brisque"] = {
            "available": False,
            "note": f"BRISQUE needs the report extra ({exc.name} is missing)",
        }
    if nima is not None:
        weights = nima_weights(nima)
        scorers["nima"] = weights
        metrics["nima"] = {
            "available": True,
            "name": "NIMA (mean rating 1-10, higher is better)",
            "weights": str(weights),
        }
    else:
        metrics["nima"] = {
            "available": False,
            "note": "NIMA needs weights: pass --nima with a NIMA checkpoint",
        }
    if not scorers:
        return {"available": False, "note": metrics["brisque"]["note"]}

    rows, sampled = [], False
    for source in sources:
        paths = sorted(source["paths"])
        if len(paths) > sample:
            paths = sorted(random.Random(seed).sample(paths, sample))
            sampled = True
        scores = {name: [] for name in scorers}
        if "brisque" in scorers:
            scores["brisque"] = _score_all(scorers["brisque"], paths)
        if "nima" in scorers:
            scores["nima"] = _nima_all(scorers["nima"], paths)
        rows.append(
            {
                "label": source["label"],
                "kind": source["kind"],
                "images": len(paths),
                "scores": scores,
                "mean": {
                    name: (sum(values) / len(values) if values else None)
                    for name, values in scores.items()
                },
            }
        )
    return {
        "available": True,
        "metrics": metrics,
        "note": f"a seeded random sample of at most {sample} images a source"
        if sampled
        else "",
        "rows": rows,
    }


def nima_weights(path: str | Path) -> Path:
    """A NIMA checkpoint file, or the one checkpoint in a folder."""
    from ..errors import ConfigError

    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(
            p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt")
        )
        if len(found) != 1:
            raise ConfigError(
                f"--nima {path}: expected one NIMA checkpoint (.safetensors or .pth) "
                f"in the folder, found {len(found)}"
            )
        return found[0]
    if not path.is_file():
        raise ConfigError(f"--nima {path}: no such file or folder")
    return path


def _images(paths: list[Path]) -> tuple[list, list[Path]]:
    from PIL import Image

    images, kept = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
            img.thumbnail((MAX_SIDE, MAX_SIDE))
            images.append(img)
            kept.append(path)
        except (OSError, ValueError) as exc:
            log.info("%s: not scored: %s", path, exc)
    return images, kept


def _nima_all(weights: Path, paths: list[Path], chunk: int = 16) -> list[float]:
    """NIMA scores through the quality plugin's network (loaded once, cached)."""
    from chatroom.plugins.quality import score_images

    scores: list[float] = []
    for start in range(0, len(paths), chunk):
        images, _ = _images(paths[start : start + chunk])
        if images:
            got = score_images(images, "nima", weights=str(weights), who="--nima")
            scores += [v for v in got if np.isfinite(v)]
    return scores


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
