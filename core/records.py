"""An accepted item becomes a record: its files written atomically, its row built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import store
from .models import Record, Reference

if TYPE_CHECKING:
    from .engine import Work


def write_record(
    out: Path, work: Work, references: dict[str, Reference]
) -> tuple[dict[str, Any], list[str]]:
    """Write the item's image, masks and pose; return its metadata row and files."""
    candidate = work.candidate
    spec = work.spec
    item = work.plan.item_id
    image_rel = f"images/{item}.png"
    store.save_image(out / image_rel, candidate.image)
    files = [image_rel]

    masks: dict[str, str] = {}
    keypoints = None
    captions: list[str] = []
    caption = None
    qa: dict[str, Any] = {}
    for note in work.annotations:
        for part, mask in note.masks.items():
            rel = f"masks/{item}/{part}.png"
            store.save_image(out / rel, mask)
            files.append(rel)
            masks[part] = rel
        if note.keypoints is not None and keypoints is None:
            keypoints = note.keypoints
        if note.caption and caption is None:
            caption = note.caption
        captions.extend(note.captions)
        qa.update({f"{note.annotator}.{k}": v for k, v in note.qa.items()})
        if note.rejected:
            qa[f"{note.annotator}.rejected"] = note.rejected
    pose_rel = None
    if keypoints is not None:
        pose_rel = f"poses/{item}.json"
        store.atomic_write_text(out / pose_rel, json.dumps({"keypoints": keypoints}))
        files.append(pose_rel)

    # the prompt's own entries: an edited prompts.jsonl may name others than the plan
    used = sorted({e.reference for e in spec.entries})
    refs = [references[r] for r in used if r in references]
    record = Record(
        item_id=item,
        index=work.index,
        file_name=image_rel,
        caption=caption,
        captions=captions,
        masks=masks,
        pose=pose_rel,
        keypoints=keypoints,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        received_prompt=candidate.received_prompt,
        seed=candidate.settings.seed,
        settings=candidate.settings,
        attributes={e.attribute: e.value for e in spec.entries},
        bank_entries=spec.entries,
        references=[r.id for r in refs],
        reference_sources=[
            {"id": r.id, "path": r.path, "source": r.source, "license": r.license}
            for r in refs
        ],
        verdicts=work.verdicts,
        annotations=[n.annotator for n in work.annotations],
        qa=qa,
        prompt_writer=spec.writer + (" (edited)" if spec.edited else ""),
        timings=candidate.timings,
        warnings=candidate.warnings,
    )
    row = record.model_dump(
        mode="json", exclude={"verdicts": {"__all__": {"artefacts"}}}
    )
    return row, files
