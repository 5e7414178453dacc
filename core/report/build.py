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


def _questions(run: RunData) -> list[dict[str, str]]:
    """The statistics questions of the pack named in run.json."""
    from ..domain import load_pack
    from ..errors import ChatroomError

    path = (run.info.get("domain") or {}).get("path")
    if not path:
        return []
    try:
        pack = load_pack(path)
    except ChatroomError as exc:
        log.warning("no statistics questions: %s", exc)
        return []
    return [q.model_dump() for q in pack.statistics]


def analyse(
    run: RunData,
    answer: stats.Answer | None = None,
    embeddings: bool = True,
    quality: bool = True,
    map_method: str = "auto",
    quality_sample: int = 200,
) -> dict[str, Any]:
    """Everything summary.json holds for one run, with seconds spent per part."""
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - started, 3)
        return result

    result = {
        "name": run.name,
        "path": str(run.out.resolve()),
        "overview": timed("overview", stats.overview, run),
        "funnel": timed("funnel", stats.funnel, run),
        "histograms": timed("histograms", stats.histograms, run),
        "statistics": timed(
            "statistics", stats.statistics, run, _questions(run), answer
        ),
    }
    if embeddings:
        from .embed import embedding_map

        result["map"] = timed("map", embedding_map, run, map_method)
    else:
        result["map"] = {"available": False, "note": "embedding map turned off"}
    if quality:
        from .quality import quality as brisque

        result["quality"] = timed("quality", brisque, run, quality_sample)
    else:
        result["quality"] = {"available": False, "note": "quality scores turned off"}
    result["timings"] = timings
    return result


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
) -> Path:
    """Write OUT/report/index.html and summary.json; return the index's path."""
    run = load_run(out)
    report = run.out / "report"
    report.mkdir(exist_ok=True)
    options = dict(
        answer=answer,
        embeddings=embeddings,
        quality=quality,
        map_method=map_method,
        quality_sample=quality_sample,
    )
    summary = analyse(run, **options)
    other = None
    if compare is not None:
        other_run = load_run(compare)
        other = analyse(other_run, **options)
        if other["name"] == summary["name"]:  # out/ vs out/: name them apart
            summary["name"] = _two_parts(summary["path"])
            other["name"] = _two_parts(other["path"])
        summary["compare"] = {
            "other": other,
            "settings_differ": stats.differing_settings(run, other_run),
        }

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
