"""Rejects images that nearly repeat one already kept in the run.

Two measures, either of which marks a duplicate:

- the perceptual hash (imagehash's DCT ``phash``): a Hamming distance at or below
  ``max_distance`` bits; it survives resizing and re-encoding;
- with ``clip_model`` set, the cosine similarity of CLIP image embeddings at or above
  ``min_similarity``; it also catches the same scene re-rendered.

The filter remembers every image it passed. Before each batch it asks the run's
journal what became of them: those rejected later (by an annotator, say) or failed
are forgotten. On a resumed run it starts from the records already written in the
run folder, so a duplicate of an image kept before the interruption is still caught.
A rejection names the record it duplicates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from chatroom.components import Filter, Options
from chatroom.errors import MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict

log = logging.getLogger(__name__)

EXTRA = "checks"
# Final states after which an image no longer stands in the dataset.
_GONE = ("rejected", "failed", "surplus")


@dataclass
class Seen:
    item_id: str
    index: int | None
    phash: Any
    embedding: Any = None


def phash(image, hash_size: int = 8):
    try:
        import imagehash
    except ImportError:
        raise MissingDependency("imagehash", EXTRA, "near_duplicates") from None
    return imagehash.phash(image.convert("RGB"), hash_size=hash_size)


class NearDuplicatesOptions(Options):
    max_distance: int = Field(
        6,
        ge=0,
        description="Perceptual-hash bits two images may differ in and still be "
        "duplicates (of 64 at hash_size 8).",
    )
    hash_size: int = Field(8, ge=4, le=32, description="Side of the DCT hash.")
    clip_model: str | None = Field(
        None, description="Local CLIP folder; when set, embeddings are compared too."
    )
    min_similarity: float = Field(
        0.95,
        gt=0,
        le=1,
        description="CLIP cosine similarity at or above which two images are "
        "duplicates.",
    )
    device: str = Field("cpu", description="Torch device for CLIP.")
    batch_size: int = Field(8, ge=1, description="Images handed to the filter at once.")


class NearDuplicatesFilter(Filter):
    name = "near_duplicates"
    description = "rejects images that nearly repeat one already kept (phash, CLIP)"
    Options = NearDuplicatesOptions
    cost = 0.5
    requires = (("imagehash", "chatroom[checks]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        self.seen: list[Seen] = []
        self._restored = False
        self._clip = None
        self.images = 0
        self.duplicates = 0

    # --- state ---------------------------------------------------------------------

    def _journal(self):
        journal = getattr(self.context, "cache", None)
        return journal if hasattr(journal, "statuses") else None

    def restore(self) -> None:
        """Start from the records already written in the run folder (a resume)."""
        self._restored = True
        journal, folder = self._journal(), self.context.workdir
        if journal is None or folder is None:
            return
        from PIL import Image

        rows = journal.records("written")
        images, owners = [], []
        for row in rows:
            path = Path(folder) / row.get("file_name", "")
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            except OSError as exc:
                log.warning("near_duplicates: cannot read %s: %s", path, exc)
                continue
            owners.append(row)
        embeddings = self._embed(images) if images else [None] * len(images)
        for row, image, embedding in zip(owners, images, embeddings, strict=True):
            self.seen.append(
                Seen(
                    row["item_id"],
                    row.get("index"),
                    phash(image, self.options.hash_size),
                    embedding,
                )
            )
        if self.seen:
            log.info("near_duplicates: %d records from earlier runs", len(self.seen))

    def _forget_dropped(self) -> None:
        journal = self._journal()
        if journal is None or not self.seen:
            return
        statuses = journal.statuses()
        self.seen = [s for s in self.seen if statuses.get(s.index) not in _GONE]

    # --- measures --------------------------------------------------------------------

    def _embed(self, images) -> list:
        if not self.options.clip_model:
            return [None] * len(images)
        from chatroom.plugins.clip_nsfw import clip_image_embeddings, load_clip

        if self._clip is None:
            self._clip = load_clip(self.options.clip_model, self.options.device)
        model, processor = self._clip
        return list(
            clip_image_embeddings(model, processor, images, self.options.device)
        )

    def _match(self, hashed, embedding) -> tuple[Seen, dict[str, float]] | None:
        options = self.options
        for other in self.seen:
            distance = hashed - other.phash
            if distance <= options.max_distance:
                return other, {"phash_distance": float(distance)}
            if embedding is not None and other.embedding is not None:
                similarity = float((embedding * other.embedding).sum())
                if similarity >= options.min_similarity:
                    return other, {"clip_similarity": round(similarity, 4)}
        return None

    def _nearest(self, hashed, embedding) -> dict[str, float]:
        scores: dict[str, float] = {}
        if self.seen:
            scores["phash_distance"] = float(min(hashed - s.phash for s in self.seen))
            sims = [
                float((embedding * s.embedding).sum())
                for s in self.seen
                if embedding is not None and s.embedding is not None
            ]
            if sims:
                scores["clip_similarity"] = round(max(sims), 4)
        return scores

    # --- the filter ------------------------------------------------------------------

    def check(self, candidates) -> list[Verdict]:
        if not self._restored:
            self.restore()
        self._forget_dropped()
        present = [c for c in candidates if c.image is not None]
        embeddings = iter(self._embed([c.image for c in present]) if present else [])
        verdicts = []
        for candidate in candidates:
            if candidate.image is None:
                verdicts.append(Verdict(passed=False, reason="no image"))
                continue
            self.images += 1
            hashed = phash(candidate.image, self.options.hash_size)
            embedding = next(embeddings)
            found = self._match(hashed, embedding)
            if found is not None:
                other, scores = found
                self.duplicates += 1
                verdicts.append(
                    Verdict(
                        passed=False,
                        reason=f"near duplicate of {other.item_id}",
                        scores=scores,
                    )
                )
                continue
            scores = self._nearest(hashed, embedding)
            verdicts.append(Verdict(passed=True, scores=scores))
            self.seen.append(
                Seen(candidate.item_id, candidate.index, hashed, embedding)
            )
        return verdicts

    def describe(self):
        measures = [f"phash (hash_size {self.options.hash_size})"]
        if self.options.clip_model:
            measures.append(f"CLIP {self.options.clip_model}")
        return {"measures": measures}

    def usage(self):
        return {"images": float(self.images), "duplicates": float(self.duplicates)}

    def close(self) -> None:
        self._clip = None


@hookimpl
def register_filters(register):
    register(NearDuplicatesFilter)
