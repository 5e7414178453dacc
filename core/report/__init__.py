"""The run report: one offline HTML page (and summary.json) that explains a run folder.

``build_report(out)`` reads run.json and the JSONL files a run writes and renders
``out/report/index.html`` with the summary, the funnel, score histograms, the
attribute statistics table, a map of text embeddings, quality scores and a gallery.
"""

from .build import build_report

__all__ = ["build_report"]
