"""Small JPEG thumbnails, and overlays of part masks and the COCO-18 skeleton."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

SIZE = 192
MASK_COLOURS = [(230, 57, 70), (42, 157, 143), (233, 196, 106), (69, 123, 157)]
# COCO-18 limbs: neck to shoulders, arms, hips, legs, head
LIMBS = [
    (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
]  # fmt: skip


def safe_name(text: str) -> str:
    """A file name made from an id; ids with other characters get a hash."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,80}", text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def thumbnail(source: Path, dest: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(source) as img:
            img = img.convert("RGB")
            img.thumbnail((SIZE, SIZE))
            dest.parent.mkdir(parents=True, exist_ok=True)
            img.save(dest, "JPEG", quality=80)
        return True
    except (OSError, ValueError) as exc:
        log.warning("%s: no thumbnail: %s", source, exc)
        return False


def overlay(
    source: Path,
    masks: list[Path],
    keypoints: list[list[float]] | None,
    dest: Path,
) -> bool:
    """The image with each mask tinted and the skeleton drawn, as a thumbnail."""
    from PIL import Image, ImageDraw

    try:
        with Image.open(source) as img:
            base = img.convert("RGB")
    except (OSError, ValueError) as exc:
        log.warning("%s: no overlay: %s", source, exc)
        return False
    for number, path in enumerate(masks):
        try:
            with Image.open(path) as mask_img:
                mask = mask_img.convert("L").resize(base.size)
        except (OSError, ValueError):
            continue
        colour = Image.new("RGB", base.size, MASK_COLOURS[number % len(MASK_COLOURS)])
        alpha = mask.point(lambda v: 110 if v > 127 else 0)
        base.paste(colour, (0, 0), alpha)
    if keypoints:
        draw = ImageDraw.Draw(base)
        width = max(2, base.width // 100)
        shown = [
            len(j) >= 2 and (len(j) < 3 or j[2] > 0.1) and (j[0] > 0 or j[1] > 0)
            for j in keypoints
        ]
        for a, b in LIMBS:
            if a < len(keypoints) and b < len(keypoints) and shown[a] and shown[b]:
                start = tuple(keypoints[a][:2])
                end = tuple(keypoints[b][:2])
                draw.line([start, end], fill=(255, 255, 0), width=width)
        for joint, ok in zip(keypoints, shown, strict=True):
            if ok:
                x, y = joint[:2]
                draw.ellipse([x - width, y - width, x + width, y + width], fill="red")
    base.thumbnail((SIZE, SIZE))
    dest.parent.mkdir(parents=True, exist_ok=True)
    base.save(dest, "JPEG", quality=80)
    return True
