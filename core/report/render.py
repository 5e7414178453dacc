"""HTML for the report. Every text that comes from a run goes through ``esc``."""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:16px;
color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}
.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:12px}.proxy{color:#8a5a00}
.bar{background:#4a7fb5;height:14px;display:inline-block;vertical-align:middle}
.bar.rej{background:#c0504d}
.hists{display:flex;flex-wrap:wrap;gap:12px}.hist{border:1px solid #eee;padding:4px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
.card{border:1px solid #ddd;padding:4px;font-size:12px;overflow-wrap:anywhere}
.card img{max-width:100%;display:block;margin:auto}
.card:has(details[open]){grid-column:1/-1}
.card .ov{display:none}#show-overlays:checked~.gallery .card .ov{display:block}
#show-overlays:checked~.gallery .card .plain.has-ov{display:none}
.lineage pre{white-space:pre-wrap;font-size:11px;background:#f8f8f8;padding:4px}
.refs img{height:64px;margin-right:4px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.pager a,.pager b{margin-right:6px}
svg text{font:10px sans-serif}
"""


def esc(value: Any) -> str:
    """HTML-escape any value as text (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' appear literally."""
    text = json.dumps(data, ensure_ascii=False, default=str)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def page(title: str, body: str, data: Any = None) -> str:
    embedded = ""
    if data is not None:
        embedded = (
            '<script type="application/json" id="report-data">'
            f"{script_json(data)}</script>"
        )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}{embedded}</body></html>\n"
    )


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return esc(f"{value:.{digits}g}")
    return esc(value)


def share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table; ``rows`` hold HTML already escaped by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


table_html = table


# ---------------------------------------------------------------- sections


def overview_section(view: dict[str, Any]) -> str:
    rows = [
        [esc(key), fmt(view.get(key))]
        for key in (
            "status",
            "domain",
            "target",
            "records",
            "rejected",
            "failed",
            "attempted",
            "references",
            "seconds",
            "updated",
            "message",
        )
    ]
    usage_rows = []
    for component, counters in view["usage"].items():
        for name, value in counters.items():
            usage_rows.append(
                [esc(component), esc(name), f'<span class="num">{fmt(value)}</span>']
            )
    for name, value in view["usage_totals"].items():
        usage_rows.append(["<b>total</b>", esc(name), f"<b>{fmt(value)}</b>"])
    usage = (
        table(["stage", "counter", "value"], usage_rows, "usage")
        if usage_rows
        else '<p class="note">No component reported usage (tokens, calls or cost).</p>'
    )
    return (
        '<section id="summary"><h2>Summary</h2>'
        f"{table(['', 'value'], rows)}<h3>Usage and estimated cost per stage</h3>"
        f"{usage}</section>"
    )


def funnel_section(data: dict[str, Any]) -> str:
    total = max(data["candidates"] or 0, 1)
    rows = [
        ["candidates", _bar(data["candidates"], total), fmt(data["candidates"]), ""]
    ]
    for step in data["steps"]:
        reasons = "<br>".join(
            f"{esc(reason)}: {count}" for reason, count in step["reasons"].items()
        )
        rows.append(
            [
                f"{esc(step['stage'])}: {esc(step['component'])}",
                _bar(step["rejected"], total, "rej"),
                f"−{step['rejected']}",
                reasons or '<span class="note">none</span>',
            ]
        )
    rows.append(["records", _bar(data["records"], total), fmt(data["records"]), ""])
    failures = (
        table(
            ["kind", "count"],
            [[esc(kind), str(count)] for kind, count in data["failures"].items()],
        )
        if data["failures"]
        else '<p class="note">No failures.</p>'
    )
    return (
        '<section id="funnel"><h2>Funnel</h2>'
        f"{table(['step', '', 'count', 'reasons'], rows, 'funnel')}"
        f"<h3>Failures by kind</h3>{failures}</section>"
    )


def _bar(count: int | None, total: int, cls: str = "") -> str:
    width = 300 * (count or 0) / total
    return f'<span class="bar {cls}" style="width:{width:.1f}px"></span>'


def histograms_section(data: dict[str, Any]) -> str:
    if not data:
        return (
            '<section id="histograms"><h2>Scores</h2>'
            '<p class="note">No verdict carried numeric scores.</p></section>'
        )
    charts = "".join(histogram_svg(name, hist) for name, hist in data.items())
    return (
        '<section id="histograms"><h2>Scores</h2><p class="note">Scores from the '
        "verdicts: blue accepted records, red rejected candidates.</p>"
        f'<div class="hists">{charts}</div></section>'
    )


def histogram_svg(name: str, hist: dict[str, Any]) -> str:
    width, height, pad = 300, 130, 18
    bins = hist["bins"]
    counts = [a + r for a, r in zip(hist["accepted"], hist["rejected"], strict=True)]
    top = max(counts) or 1
    step = (width - 2 * pad) / bins
    bars = []
    for i, (accepted, rejected) in enumerate(
        zip(hist["accepted"], hist["rejected"], strict=True)
    ):
        x = pad + i * step
        h_a = (height - 2 * pad) * accepted / top
        h_r = (height - 2 * pad) * rejected / top
        base = height - pad
        if accepted:
            bars.append(
                f'<rect x="{x:.1f}" y="{base - h_a:.1f}" width="{step - 1:.1f}" '
                f'height="{h_a:.1f}" fill="#4a7fb5"><title>{accepted} accepted'
                "</title></rect>"
            )
        if rejected:
            bars.append(
                f'<rect x="{x:.1f}" y="{base - h_a - h_r:.1f}" width="{step - 1:.1f}" '
                f'height="{h_r:.1f}" fill="#c0504d"><title>{rejected} rejected'
                "</title></rect>"
            )
    return (
        f'<div class="hist"><svg class="histogram" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(name)}">'
        f'<text x="{pad}" y="12">{esc(name)}</text>{"".join(bars)}'
        f'<text x="{pad}" y="{height - 4}">{fmt(hist["low"])}</text>'
        f'<text x="{width - pad}" y="{height - 4}" text-anchor="end">'
        f"{fmt(hist['high'])}</text></svg></div>"
    )


def statistics_section(data: dict[str, Any]) -> str:
    rows = []
    for q in data["questions"]:
        if q["measured"]:
            ref, gen = share(q["references"]), share(q["generated"])
        else:
            ref = gen = '<span class="note">not measured</span>'
        rows.append(
            [
                esc(q["name"]),
                esc(q["question"]),
                ref,
                gen,
                f'<span class="proxy">{share(q["proxy_references"])}</span>',
                f'<span class="proxy">{share(q["proxy_generated"])}</span>',
            ]
        )
    if not rows:
        body = '<p class="note">The domain pack asks no statistics questions.</p>'
    else:
        body = table(
            [
                "statistic",
                "question",
                "reference",
                "generated",
                "proxy: reference",
                "proxy: generated",
            ],
            rows,
            "statistics",
        )
    method = (
        f"Answered image by image by {data['method']}."
        if data["measured"]
        else "No vision-language model answered the questions (pass --vlm): shares "
        "are not measured."
    )
    return (
        '<section id="statistics"><h2>Attribute statistics</h2>'
        f"{attribute_table(data.get('table'), data['questions'])}"
        f'{body}<p class="note">{esc(method)} <span class="proxy">Proxy columns '
        "(offline, not the paper's measure): the share of references and records "
        "whose attribute values mention the statistic's keyword.</span></p></section>"
    )


def answer_cell(counts: dict[str, int]) -> str:
    """A share of "yes" among the clear answers, with the counts behind it."""
    clear = counts["yes"] + counts["no"]
    unclear = counts["unclear"]
    if not clear and not unclear:
        return "–"
    if not clear:
        return f'<span class="note">unanswered ({unclear} unclear)</span>'
    tail = f"; {unclear} unclear" if unclear else ""
    return (
        f"{share(counts['share'])} "
        f'<span class="note">({counts["yes"]} of {clear}{tail})</span>'
    )


def attribute_table(table: dict[str, Any] | None, questions: list[dict]) -> str:
    """The paper's Table 1: one row per image set, one column per question."""
    if not table:
        return ""
    names = [q["name"] for q in questions]
    rows = [
        [esc(row["label"]), f"{row['images']} of {row['available']}"]
        + [answer_cell(row["answers"][name]) for name in names]
        for row in table["rows"]
    ]
    return (
        f"{table_html(['images', 'sample', *names], rows, 'table1')}"
        f'<p class="note">Share of "yes" among the clear answers, each image set '
        f"cut to the same seeded random sample of {table['sample']} images "
        f"(seed {esc(table['seed'])}). Answers that are neither yes nor no "
        "count as unclear.</p>"
    )


COLOURS = ["#e07b00", "#4a7fb5", "#2a9d4f", "#8e44ad", "#c0504d", "#555555"]


def map_section(data: dict[str, Any]) -> str:
    if not data.get("available"):
        return (
            '<section id="map"><h2>Embedding map</h2>'
            f'<p class="note">{esc(data.get("note", "not available"))}</p></section>'
        )
    width, height, pad = 560, 400, 20
    groups = data.get("groups") or [
        {"kind": kind, "label": kind}
        for kind in dict.fromkeys(p["kind"] for p in data["points"])
    ]
    colour = {g["kind"]: COLOURS[i % len(COLOURS)] for i, g in enumerate(groups)}
    xs = [p["x"] for p in data["points"]] or [0.0]
    ys = [p["y"] for p in data["points"]] or [0.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    dots = []
    for p in data["points"]:
        radius = 5 if p["kind"] == groups[0]["kind"] else 3
        x = pad + (p["x"] - x0) * sx
        y = height - pad - (p["y"] - y0) * sy
        text = f": {p['text'][:300]}" if p.get("text") else ""
        dots.append(
            f'<circle class="{esc(p["kind"])}" cx="{x:.1f}" cy="{y:.1f}" r="{radius}" '
            f'fill="{colour.get(p["kind"], "#999")}" fill-opacity="0.75">'
            f"<title>{esc(p['label'])}{esc(text)}</title></circle>"
        )
    title = f"{data['method']} of {data['features']}"
    legend = " ".join(
        f'<span style="color:{colour[g["kind"]]}">● {esc(g["label"])}</span>'
        for g in groups
    )
    return (
        f'<section id="map"><h2>Embedding map</h2><p>{esc(title)}. {legend}</p>'
        f'<svg class="scatter" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(title)}" style="border:1px solid #eee">{"".join(dots)}'
        f'</svg><p class="note">{esc(data.get("note", ""))}</p></section>'
    )


def quality_section(data: dict[str, Any]) -> str:
    if not data.get("available"):
        return (
            '<section id="quality"><h2>Quality</h2>'
            f'<p class="note">{esc(data.get("note", "not available"))}</p></section>'
        )
    from .stats import _counts

    metrics = data["metrics"]
    shown = [name for name, m in metrics.items() if m.get("available")]
    headers = ["images"]
    for name in shown:
        headers += [f"{name}: scored", f"{name}: mean"]
    rows = []
    for row in data["rows"]:
        cells = [esc(row["label"])]
        for name in shown:
            cells += [str(len(row["scores"][name])), fmt(row["mean"][name])]
        rows.append(cells)
    charts = []
    for name in shown:
        everything = [v for row in data["rows"] for v in row["scores"][name]]
        if not everything:
            continue
        low, high = min(everything), max(everything)
        for row in data["rows"]:
            if row["scores"][name]:
                counts = _counts(row["scores"][name], low, high, 20)
                charts.append(
                    histogram_svg(
                        f"{name}: {row['label']}",
                        {
                            "bins": 20,
                            "low": low,
                            "high": high,
                            "accepted": counts,
                            "rejected": [0] * 20,
                        },
                    )
                )
    described = "; ".join(
        m["name"] if m.get("available") else m.get("note", "") for m in metrics.values()
    )
    return (
        f'<section id="quality"><h2>Quality</h2><p>{esc(described)}. '
        f"{esc(data.get('note', ''))}</p>"
        f"{table(headers, rows, 'quality')}"
        f'<div class="hists">{"".join(charts)}</div></section>'
    )


def card(record: dict[str, Any], thumb: str, overlay: str, refs: dict[str, str]) -> str:
    """One gallery card: the thumbnail and the record's lineage in a details element."""
    item = esc(record.get("item_id", ""))
    has_ov = ' has-ov"' if overlay else '"'
    images = f'<img class="thumb plain{has_ov} src="{esc(thumb)}" alt="{item}" loading="lazy">'
    if overlay:
        images += f'<img class="ov" src="{esc(overlay)}" alt="{item} with masks and pose" loading="lazy">'

    ref_imgs = "".join(
        '<figure style="display:inline-block;margin:0 4px 0 0">'
        + (f'<img src="{esc(refs[r])}" alt="{esc(r)}">' if r in refs else "")
        + f"<figcaption>{esc(r)}</figcaption></figure>"
        for r in record.get("references") or []
    )
    attributes = table(
        ["attribute", "value", "reference"],
        [
            [esc(e.get("attribute")), esc(e.get("value")), esc(e.get("reference"))]
            for e in record.get("bank_entries") or []
        ]
        or [[esc(k), esc(v), ""] for k, v in (record.get("attributes") or {}).items()],
    )
    verdicts = table(
        ["filter", "passed", "reason", "scores"],
        [
            [
                esc(v.get("filter")) + (" (observe)" if v.get("observed") else ""),
                "yes" if v.get("passed") else "no",
                esc(v.get("reason")),
                esc(json.dumps(v.get("scores") or {})),
            ]
            for v in record.get("verdicts") or []
        ],
    )
    notes = {
        "annotators": record.get("annotations"),
        "caption": record.get("caption"),
        "captions": record.get("captions"),
        "masks": record.get("masks"),
        "pose": record.get("pose"),
        "qa": record.get("qa"),
        "warnings": record.get("warnings"),
    }
    settings = {"seed": record.get("seed"), **(record.get("settings") or {})}
    return (
        f'<div class="card" id="r-{item}">{images}'
        f"<div><b>{item}</b> seed {esc(record.get('seed'))}</div>"
        f"<div>{esc(record.get('caption') or '')}</div>"
        '<details class="lineage"><summary>lineage</summary>'
        f'<h4>references</h4><div class="refs">{ref_imgs or "–"}</div>'
        f"<h4>attributes</h4>{attributes}"
        f"<h4>prompt ({esc(record.get('prompt_writer', ''))})</h4>"
        f"<pre>{esc(record.get('prompt'))}</pre>"
        f"<h4>negative prompt</h4><pre>{esc(record.get('negative_prompt'))}</pre>"
        f"<h4>settings</h4><pre>{esc(json.dumps(settings, indent=1))}</pre>"
        f"<h4>verdicts</h4>{verdicts}"
        f"<h4>annotations</h4><pre>{esc(json.dumps(notes, indent=1))}</pre>"
        "</details></div>"
    )


def gallery_section(cards: list[str], pager: str, total: int) -> str:
    return (
        f'<section id="gallery"><h2>Gallery ({total} records)</h2>{pager}'
        '<input type="checkbox" id="show-overlays"> '
        '<label for="show-overlays">show masks and skeletons</label>'
        f'<div class="gallery">{"".join(cards)}</div>{pager}</section>'
    )


def pager(current: int, pages: list[str]) -> str:
    if len(pages) < 2:
        return ""
    links = [
        f"<b>{n}</b>" if n == current else f'<a href="{esc(href)}">{n}</a>'
        for n, href in enumerate(pages, 1)
    ]
    return f'<nav class="pager">pages: {"".join(links)}</nav>'


def _measured(question: dict[str, Any]) -> str:
    if not question.get("measured"):
        return '<span class="note">not measured</span>'
    return share(question.get("generated"))


def compare_section(a: dict[str, Any], b: dict[str, Any], diff: list[dict]) -> str:
    """Two runs side by side: counts, funnels, statistics, differing settings."""
    keys = ["status", "target", "records", "rejected", "failed", "attempted", "seconds"]
    counts = table(
        ["", esc(a["name"]), esc(b["name"])],
        [[esc(k), fmt(a["overview"].get(k)), fmt(b["overview"].get(k))] for k in keys],
        "compare-counts",
    )
    steps: dict[str, list[str]] = {}
    for side, summary in enumerate((a, b)):
        for step in summary["funnel"]["steps"]:
            label = f"{step['stage']}: {step['component']}"
            steps.setdefault(label, ["0", "0"])[side] = str(step["rejected"])
    funnel_rows = [
        ["candidates", fmt(a["funnel"]["candidates"]), fmt(b["funnel"]["candidates"])]
    ]
    funnel_rows += [[esc(label), *values] for label, values in steps.items()]
    funnel_rows.append(
        ["records", fmt(a["funnel"]["records"]), fmt(b["funnel"]["records"])]
    )
    shares = []
    b_questions = {q["name"]: q for q in b["statistics"]["questions"]}
    for q in a["statistics"]["questions"]:
        other = b_questions.get(q["name"], {})
        shares.append(
            [
                esc(q["name"]),
                _measured(q),
                _measured(other),
                share(q.get("proxy_generated")),
                share(other.get("proxy_generated")),
            ]
        )
    settings = (
        table(
            ["setting", esc(a["name"]), esc(b["name"])],
            [[esc(d["key"]), esc(d["a"]), esc(d["b"])] for d in diff],
            "compare-settings",
        )
        if diff
        else '<p class="note">No setting differs.</p>'
    )
    return (
        '<section id="compare"><h2>Comparison</h2>'
        f"<p>A: <b>{esc(a['name'])}</b> ({esc(a['path'])}) — B: "
        f"<b>{esc(b['name'])}</b> ({esc(b['path'])})</p>"
        f"<h3>Counts</h3>{counts}"
        f"<h3>Funnel</h3>{table(['step', 'A', 'B'], funnel_rows, 'compare-funnel')}"
        "<h3>Statistics (generated)</h3>"
        f"{table(['statistic', 'A', 'B', 'proxy A', 'proxy B'], shares, 'compare-stats')}"
        f"<h3>Settings that differ</h3>{settings}</section>"
    )
