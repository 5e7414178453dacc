"""Numbers for the report: costs, the funnel, score histograms and attribute shares."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .load import RunData

log = logging.getLogger(__name__)

# answer(image_path, question) -> True for "yes"; a VLM behind it in real use
Answer = Callable[[Path, str], bool]


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


def statistics(
    run: RunData, questions: list[dict[str, str]], answer: Answer | None = None
) -> dict[str, Any]:
    """Share of "yes" per statistics question, in references and in records.

    With ``answer`` (a VLM, say) each image is asked each question. Without it the
    shares are "not measured", and an offline proxy is given instead: the share of
    records (and of references, from the attribute bank) whose attribute values
    mention the statistic's keyword.
    """
    reference_paths = [Path(ref["path"]) for ref in run.references if ref.get("path")]
    record_paths = [run.out / row["file_name"] for row in run.records]

    # offline proxy: attribute text per record and per reference
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
        row: dict[str, Any] = {
            "name": name,
            "question": text,
            "keyword": keyword,
            "measured": answer is not None,
            "references": None,
            "generated": None,
            "proxy_references": _keyword_share(reference_texts, keyword),
            "proxy_generated": _keyword_share(record_texts, keyword),
        }
        if answer is not None:
            row["references"] = _ask(answer, reference_paths, text)
            row["generated"] = _ask(answer, record_paths, text)
        rows.append(row)
    return {
        "measured": answer is not None,
        "method": "answer()" if answer is not None else "not measured",
        "proxy": "share whose attribute values mention the keyword",
        "questions": rows,
    }


def _ask(answer: Answer, paths: list[Path], question: str) -> float | None:
    answered = []
    for path in paths:
        try:
            answered.append(bool(answer(path, question)))
        except Exception as exc:  # one bad image must not sink the table
            log.warning("%s: no answer to %r: %s", path, question, exc)
    return sum(answered) / len(answered) if answered else None


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
