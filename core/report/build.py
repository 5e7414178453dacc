"""Build OUT/report/: index.html (+ gallery pages), thumbs/ and summary.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from . import render, stats
from .load import RunData, load_run
from .thumbs import overlay, safe_name, thumbnail

log = logging.getLogger(__name__)

PAGE_SIZE = 100


def _pack(run: RunData):
    """The domain pack named in run.json, or None."""
    from ..domain import load_pack
    from ..errors import ChatroomError

    path = (run.info.get("domain") or {}).get("path")
    if not path:
        return None
    try:
        return load_pack(path)
    except ChatroomError as exc:
        log.warning("no statistics questions: %s", exc)
        return None


def _questions(run: RunData) -> list[dict[str, str]]:
    """The statistics questions of the pack named in run.json."""
    pack = _pack(run)
    return [q.model_dump() for q in pack.statistics] if pack else []


class _Timer:
    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def __call__(self, name, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - started, 3)
        return result


def analyse(
    run: RunData, embeddings: bool = True, map_method: str = "auto"
) -> dict[str, Any]:
    """What summary.json holds for one run alone, with seconds spent per part."""
    timings: dict[str, float] = {}
    timed = _Timer(timings)
    result = {
        "name": run.name,
        "path": str(run.out.resolve()),
        "extraction": extraction(run),
        "overview": timed("overview", stats.overview, run),
        "funnel": timed("funnel", stats.funnel, run),
        "histograms": timed("histograms", stats.histograms, run),
        "statistics": timed("statistics", stats.statistics, run, _questions(run)),
    }
    if embeddings:
        from .embed import embedding_map

        result["map"] = timed("map", embedding_map, run, map_method)
    else:
        result["map"] = {"available": False, "note": "embedding map turned off"}
    result["timings"] = timings
    return result


def extraction(run: RunData) -> bool:
    """Whether the run extracted attributes (runs before the setting existed did)."""
    return bool(run.settings().get("extraction", True))


def _sources(runs: list[RunData], names: list[str]) -> list[dict[str, Any]]:
    """The image sets the evaluation compares: the references, then each run."""
    first = runs[0]
    sources = [
        {
            "label": "reference images",
            "kind": "reference",
            "run": names[0],
            "path": str(first.out.resolve()),
            "extraction": None,
            "paths": [Path(r["path"]) for r in first.references if r.get("path")],
        }
    ]
    # Table 1's order: without extraction before with it
    order = sorted(range(len(runs)), key=lambda i: extraction(runs[i]))
    for i in order:
        run = runs[i]
        used = extraction(run)
        sources.append(
            {
                "label": f"{'with' if used else 'without'} extraction ({names[i]})",
                "kind": "generated",
                "run": names[i],
                "path": str(run.out.resolve()),
                "extraction": used,
                "paths": [run.out / row["file_name"] for row in run.records],
            }
        )
    return sources


def _baseline(folder: str | Path) -> dict[str, Any]:
    """A folder of someone else's images, for the quality table."""
    from ..errors import InputError
    from ..references import IMAGE_SUFFIXES

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"--baseline {path}: not a folder")
    paths = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise InputError(f"--baseline {path}: no images in the folder")
    return {"label": f"baseline: {path.name}", "kind": "baseline", "paths": paths}


def _asker(answer, vlm, run: RunData, report: Path):
    """(ask, description, closer) for the statistics table, or Nones."""
    from . import vlm as vlms

    if answer is not None:
        return vlms.from_function(answer), "answer()", None
    if vlm is None:
        return None, "", None
    if isinstance(vlm, str | Path):
        pack = _pack(run)
        if pack is None:
            return None, "", None
        vlm = vlms.load_vlm(vlm, pack)
    asker = vlms.YesNo(vlm, report)
    return asker, asker.name, asker.close


def _thumbs(run: RunData, report: Path) -> tuple[dict[str, tuple[str, str]], dict]:
    """Thumbnails of records (plain and overlay) and references, as relative paths."""
    records: dict[str, tuple[str, str]] = {}
    for row in run.records:
        item = str(row.get("item_id", ""))
        name = safe_name(item)
        plain = f"thumbs/{name}.jpg"
        source = run.out / row.get("file_name", "")
        if not (report / plain).is_file():
            thumbnail(source, report / plain)
        shown = ""
        masks = [run.out / p for p in (row.get("masks") or {}).values()]
        if masks or row.get("keypoints"):
            shown = f"thumbs/{name}-overlay.jpg"
            if not (report / shown).is_file() and not overlay(
                source, masks, row.get("keypoints"), report / shown
            ):
                shown = ""
        records[item] = (plain, shown)
    references = {}
    for ref in run.references:
        rel = f"thumbs/ref-{safe_name(str(ref.get('id')))}.jpg"
        if (report / rel).is_file() or thumbnail(
            Path(ref.get("path", "")), report / rel
        ):
            references[str(ref.get("id"))] = rel
    return records, references


def _two_parts(path: str) -> str:
    """The folder's name and its parent's, e.g. cfg4/out."""
    return "/".join(Path(path).parts[-2:])


def build_report(
    out: str | Path,
    compare: str | Path | None = None,
    answer: stats.Answer | None = None,
    embeddings: bool = True,
    quality: bool = True,
    map_method: str = "auto",
    page_size: int = PAGE_SIZE,
    quality_sample: int = 200,
    vlm: Any = None,
    clip: str | Path | None = None,
    nima: str | Path | None = None,
    baselines: tuple[str | Path, ...] | list[str | Path] = (),
    stat_sample: int = 200,
    seed: int = 0,
) -> Path:
    """Write OUT/report/index.html and summary.json; return the index's path.

    ``answer(image_path, question)`` or ``vlm`` (a config file naming a model, or a
    component with ``ask(images, question)``) answers the statistics questions;
    ``clip`` (a CLIPModel folder) maps image features instead of text; ``nima``
    (weights) scores aesthetics next to BRISQUE, also for the ``baselines`` folders.
    """
    run = load_run(out)
    report = run.out / "report"
    report.mkdir(exist_ok=True)
    baseline_sources = [_baseline(folder) for folder in baselines]
    text_map = embeddings and clip is None
    summary = analyse(run, embeddings=text_map, map_method=map_method)
    runs, summaries = [run], [summary]
    if compare is not None:
        other_run = load_run(compare)
        other = analyse(other_run, embeddings=text_map, map_method=map_method)
        if other["name"] == summary["name"]:  # out/ vs out/: name them apart
            summary["name"] = _two_parts(summary["path"])
            other["name"] = _two_parts(other["path"])
        summary["compare"] = {
            "other": other,
            "settings_differ": stats.differing_settings(run, other_run),
        }
        runs.append(other_run)
        summaries.append(other)
    sources = _sources(runs, [s["name"] for s in summaries])
    timed = _Timer(summary["timings"])

    # Table 1: the same questions about equal samples of every image set
    questions = _questions(run)
    ask, method, close = _asker(answer, vlm, run, report) if questions else (None,) * 3
    if ask is not None:
        try:
            table = timed(
                "statistics table",
                stats.attribute_table,
                sources,
                questions,
                ask,
                stat_sample,
                seed,
            )
        finally:
            if close is not None:
                close()
        summary["statistics"]["table"] = table
        for one in summaries:
            stats.measured(one["statistics"], table, one["path"])
            one["statistics"]["method"] = method
        summary["statistics"]["asked"] = getattr(ask, "asked", None)

    if clip is not None and embeddings:
        from .embed import clip_map

        summary["map"] = timed("map", clip_map, sources, clip, map_method, seed=seed)
    if quality:
        from .quality import quality as score

        summary["quality"] = timed(
            "quality", score, sources + baseline_sources, quality_sample, nima, seed
        )
    else:
        summary["quality"] = {"available": False, "note": "quality scores turned off"}

    # the gallery: thumbnails, then pages of cards
    records, references = _thumbs(run, report)
    pages = [
        run.records[i : i + page_size] for i in range(0, len(run.records), page_size)
    ] or [[]]
    hrefs = ["index.html"] + [f"page-{n}.html" for n in range(2, len(pages) + 1)]
    title = f"chatroom report: {summary['name']}"
    for number, rows in enumerate(pages, 1):
        cards = [
            render.card(row, *records[str(row.get("item_id", ""))], references)
            for row in rows
        ]
        gallery = render.gallery_section(
            cards, render.pager(number, hrefs), len(run.records)
        )
        if number == 1:
            body = _index_body(summary, title, gallery)
            html = render.page(title, body, data=_embedded(summary))
        else:
            body = (
                f'<h1>{render.esc(title)}</h1><p><a href="index.html">summary</a></p>'
                f"{gallery}"
            )
            html = render.page(f"{title} (page {number})", body)
        (report / hrefs[number - 1]).write_text(html, encoding="utf-8")

    (report / "summary.json").write_text(
        json.dumps(summary, indent=1, default=str), encoding="utf-8"
    )
    return report / "index.html"


def _index_body(summary: dict[str, Any], title: str, gallery: str) -> str:
    parts = [
        f"<h1>{render.esc(title)}</h1>",
        '<p class="note">Sections: <a href="#summary">summary</a> · '
        '<a href="#funnel">funnel</a> · <a href="#histograms">scores</a> · '
        '<a href="#statistics">statistics</a> · <a href="#map">map</a> · '
        '<a href="#quality">quality</a> · <a href="#gallery">gallery</a></p>',
    ]
    if "compare" in summary:
        compare = summary["compare"]
        parts.append(
            render.compare_section(
                summary, compare["other"], compare["settings_differ"]
            )
        )
    parts += [
        render.overview_section(summary["overview"]),
        render.funnel_section(summary["funnel"]),
        render.histograms_section(summary["histograms"]),
        render.statistics_section(summary["statistics"]),
        render.map_section(summary["map"]),
        render.quality_section(summary["quality"]),
        gallery,
    ]
    return "".join(parts)


def _embedded(summary: dict[str, Any]) -> dict[str, Any]:
    """The page's machine-readable copy: summary.json without the map's points."""
    data = {k: v for k, v in summary.items() if k not in ("map", "compare")}
    data["map"] = {k: v for k, v in summary["map"].items() if k != "points"}
    return data
