"""Reading a references folder: images in, bad files out with their reasons."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from pathlib import Path

from .errors import InputError
from .models import Failure, Reference

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "sources.csv")


def load_image(path: str | Path):
    """Open an image as 8-bit RGB, upright (EXIF orientation applied)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit and 32-bit integer greyscale: scale to 8 bits, don't clip.
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray((arr / top * 255.0).round().astype("uint8"), "L")
        if img.mode in ("RGBA", "LA", "P", "PA"):
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(base, rgba)
        return img.convert("RGB")


def _metadata(folder: Path) -> dict[str, dict[str, str]]:
    """Source and licence per file name, from an optional metadata file."""
    for name in METADATA_FILES:
        path = folder / name
        if not path.is_file():
            continue
        rows: list[dict] = []
        try:
            if path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        rows.append(json.loads(line))
            else:
                with path.open(newline="", encoding="utf-8") as fh:
                    rows = list(csv.DictReader(fh))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read reference metadata: {exc}") from None
        out = {}
        for row in rows:
            name = row.get("file_name") or row.get("file") or row.get("path")
            if name:
                out[Path(name).name] = {
                    "source": row.get("source") or row.get("url"),
                    "license": row.get("license") or row.get("licence"),
                }
        return out
    return {}


def scan(folder: str | Path) -> list[Path]:
    """The image-like files of a references folder, sorted by name."""
    folder = Path(folder).expanduser()
    if not str(folder) or not folder.exists():
        raise InputError(f"references folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"references path is not a folder: {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if not p.is_dir()
        and not p.name.startswith(".")
        and p.name not in METADATA_FILES
    )
    if not files:
        raise InputError(f"references folder is empty: {folder}")
    return files


def load_references(
    folder: str | Path, sample: int = 0, seed: int = 0
) -> tuple[list[Reference], list[Failure]]:
    """Validate every reference; return the usable ones and a failure per bad file.

    With ``sample`` > 0, a seeded random subset of that many files is used.
    """
    files = scan(folder)
    if sample and sample < len(files):
        files = sorted(random.Random(seed).sample(files, sample))
    meta = _metadata(Path(folder))
    refs: list[Reference] = []
    failures: list[Failure] = []
    stems = [p.stem.lower() for p in files]
    for path in files:
        reason = "" if path.is_file() else "not a regular file (or a broken link)"
        reason = reason or _check(path)
        if reason:
            log.warning("reference %s skipped: %s", path.name, reason)
            failures.append(Failure(kind="reference", subject=str(path), reason=reason))
            continue
        data = path.read_bytes()
        img = load_image(path)
        info = meta.get(path.name, {})
        # the file's stem names it, unless another file shares the stem
        ref_id = path.stem if stems.count(path.stem.lower()) == 1 else path.name
        refs.append(
            Reference(
                id=ref_id,
                path=str(path.resolve()),
                sha256=hashlib.sha256(data).hexdigest(),
                width=img.width,
                height=img.height,
                source=info.get("source"),
                license=info.get("license"),
            )
        )
    if not refs:
        raise InputError(
            f"references folder has no usable image: {folder} "
            f"({len(failures)} skipped, first: {failures[0].reason})"
        )
    return refs, failures


def _check(path: Path) -> str:
    """Why a file cannot serve as a reference, or '' when it can."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            Image.open(path).close()
        except Exception:
            return f"not an image ({path.suffix or 'no suffix'})"
    try:
        img = load_image(path)
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Image.DecompressionBombError as exc:
        return f"refused: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image: {exc}"
    if img.width < 16 or img.height < 16:
        return f"too small ({img.width}x{img.height})"
    return ""
