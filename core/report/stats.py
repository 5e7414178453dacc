"""Numbers for the report: costs, the funnel, score histograms and attribute shares."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .load import RunData

log = logging.getLogger(__name__)

# answer(image_path, question) -> True yes, False no, None unclear; a VLM in real use
Answer = Callable[[Path, str], bool | None]


def overview(run: RunData) -> dict[str, Any]:
    """Status, counts, time and each component's usage (tokens, calls, cost)."""
    summary = run.summary
    usage = {}
    for key, component in (run.info.get("components") or {}).items():
        if component.get("usage"):
            usage[key] = component["usage"]
    totals: dict[str, float] = defaultdict(float)
    for counters in usage.values():
        for name, value in counters.items():
            if isinstance(value, int | float):
                totals[name] += value
    return {
        "status": run.info.get("status", summary.get("status", "")),
        "domain": (run.info.get("domain") or {}).get("name", ""),
        "target": summary.get("target"),
        "written": summary.get("written", len(run.records)),
        "records": len(run.records),
        "rejected": summary.get("rejected", len(run.rejected)),
        "failed": summary.get("failed", len(run.failures)),
        "attempted": summary.get("attempted"),
        "seconds": summary.get("seconds"),
        "references": len(run.references),
        "updated": run.info.get("updated", ""),
        "message": summary.get("message", ""),
        "usage": usage,
        "usage_totals": dict(totals),
    }


def funnel(run: RunData) -> dict[str, Any]:
    """Candidates, then each filter's and annotator's rejections, then records."""
    filters = [
        key.split(":", 1)[1]
        for key in (run.info.get("components") or {})
        if key.startswith("filter:")
    ]
    stages: dict[tuple[str, str], Counter] = {}
    for row in run.rejected:
        stage = row.get("stage") or "filter"
        component = row.get("component") or "?"
        reason = row.get("reason") or "(no reason given)"
        stages.setdefault((stage, component), Counter())[reason] += 1
    # filters in run order first, then any stage that rejected without being listed
    order = [("filter", name) for name in filters]
    order += sorted(key for key in stages if key not in order)
    steps = []
    for stage, component in order:
        reasons = stages.get((stage, component), Counter())
        steps.append(
            {
                "stage": stage,
                "component": component,
                "rejected": sum(reasons.values()),
                "reasons": dict(reasons.most_common()),
            }
        )
    failures = Counter(
        str(row.get("kind") or row.get("stage") or "other") for row in run.failures
    )
    rejected = sum(step["rejected"] for step in steps)
    attempted = run.summary.get("attempted")
    candidates = attempted if attempted else len(run.records) + rejected
    return {
        "candidates": candidates,
        "steps": steps,
        "records": len(run.records),
        "failures": dict(failures.most_common()),
    }


def score_values(run: RunData) -> dict[str, dict[str, list[float]]]:
    """{"filter.score": {"accepted": [...], "rejected": [...]}} from every verdict."""
    values: dict[str, dict[str, list[float]]] = {}

    def add(name: str, scores: dict[str, Any] | None, side: str) -> None:
        for key, value in (scores or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            entry = values.setdefault(f"{name}.{key}", {"accepted": [], "rejected": []})
            entry[side].append(float(value))

    for record in run.records:
        for verdict in record.get("verdicts") or []:
            add(verdict.get("filter", "?"), verdict.get("scores"), "accepted")
    for row in run.rejected:
        add(row.get("component", "?"), row.get("scores"), "rejected")
    return dict(sorted(values.items()))


def histograms(run: RunData, bins: int = 20) -> dict[str, Any]:
    out = {}
    for name, sides in score_values(run).items():
        everything = sides["accepted"] + sides["rejected"]
        low, high = min(everything), max(everything)
        out[name] = {
            "low": low,
            "high": high,
            "bins": bins,
            "accepted": _counts(sides["accepted"], low, high, bins),
            "rejected": _counts(sides["rejected"], low, high, bins),
        }
    return out


def _counts(values: list[float], low: float, high: float, bins: int) -> list[int]:
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return counts


def _keyword_share(texts: list[str], keyword: str) -> float | None:
    if not texts:
        return None
    return sum(keyword in text for text in texts) / len(texts)


def statistics(run: RunData, questions: list[dict[str, str]]) -> dict[str, Any]:
    """The statistics questions with an offline proxy for each.

    The measured shares come from ``attribute_table`` (a VLM or an answer function
    looks at the images) and are filled in by ``measured``; until then they are
    "not measured". The proxy is the share of records (and of references, from the
    attribute bank) whose attribute values mention the statistic's keyword.
    """
    record_texts = [
        " ".join(str(v) for v in (row.get("attributes") or {}).values()).lower()
        for row in run.records
    ]
    by_reference: dict[str, list[str]] = defaultdict(list)
    for entry in run.attributes:
        by_reference[str(entry.get("reference"))].append(str(entry.get("value", "")))
    reference_texts = [" ".join(values).lower() for values in by_reference.values()]

    rows = []
    for question in questions:
        name, text = question["name"], question["question"]
        keyword = name.replace("_", " ").lower()
        rows.append(
            {
                "name": name,
                "question": text,
                "keyword": keyword,
                "measured": False,
                "references": None,
                "generated": None,
                "proxy_references": _keyword_share(reference_texts, keyword),
                "proxy_generated": _keyword_share(record_texts, keyword),
            }
        )
    return {
        "measured": False,
        "method": "not measured",
        "proxy": "share whose attribute values mention the keyword",
        "questions": rows,
    }


# ask(image_paths, question) -> one answer each: True yes, False no, None unclear
Ask = Callable[[list[Path], str], list[bool | None]]


def attribute_table(
    sources: list[dict[str, Any]],
    questions: list[dict[str, str]],
    ask: Ask,
    sample: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The paper's Table 1: the share of "yes" per question, one row per source.

    Each source (``label``, ``paths`` and anything else worth keeping) is cut to a
    seeded random sample of the same size: the smallest non-empty source, at most
    ``sample``. A share counts the clear answers only; the unclear ones are counted
    beside it.
    """
    sizes = [len(s["paths"]) for s in sources if s["paths"]]
    size = min([*sizes, sample]) if sizes else 0
    rows = []
    for source in sources:
        paths = sorted(source["paths"])
        if len(paths) > size:
            paths = sorted(random.Random(seed).sample(paths, size))
        answers = {}
        for question in questions:
            got = ask(paths, question["question"]) if paths else []
            yes = sum(a is True for a in got)
            no = sum(a is False for a in got)
            answers[question["name"]] = {
                "yes": yes,
                "no": no,
                "unclear": len(got) - yes - no,
                "share": yes / (yes + no) if yes + no else None,
            }
        row = {k: v for k, v in source.items() if k != "paths"}
        row.update(images=len(paths), available=len(source["paths"]), answers=answers)
        rows.append(row)
    return {"sample": size, "seed": seed, "rows": rows}


def measured(statistics: dict[str, Any], table: dict[str, Any], path: str) -> None:
    """Fill the "references" and "generated" shares of the run at ``path``."""
    reference = next((r for r in table["rows"] if r["kind"] == "reference"), None)
    generated = next(
        (r for r in table["rows"] if r["kind"] == "generated" and r["path"] == path),
        None,
    )
    statistics["measured"] = True
    for question in statistics["questions"]:
        name = question["name"]
        question["measured"] = True
        if reference is not None:
            question["references"] = reference["answers"][name]["share"]
        if generated is not None:
            question["generated"] = generated["answers"][name]["share"]


def differing_settings(a: RunData, b: RunData) -> list[dict[str, Any]]:
    """Settings whose values differ between two runs (output folders aside)."""
    left, right = a.settings(), b.settings()
    rows = []
    for key in sorted(set(left) | set(right)):
        if key in ("output", "references"):
            continue
        if left.get(key) != right.get(key):
            rows.append({"key": key, "a": left.get(key), "b": right.get(key)})
    return rows
