"""The engine with fake stages: records, lineage, over-generation, resume, editing."""

import json

import pytest

from chatroom.components import Filter
from chatroom.errors import ChatroomError, ResumeError
from chatroom.hookspecs import hookimpl
from chatroom.plugins.template_prompter import clean_value
from chatroom.testing import FakeGenerator


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_writes_records_with_lineage(chatroom_run, few_refs):
    summary, out = chatroom_run(few_refs, count=4)

    assert summary.status == "complete"
    records = rows(out / "metadata.jsonl")
    assert len(records) == 4
    assert len({r["item_id"] for r in records}) == 4
    reference_ids = {p.stem for p in few_refs.iterdir()}
    for record in records:
        assert (out / record["file_name"]).is_file()
        assert record["references"] and set(record["references"]) <= reference_ids
        assert record["bank_entries"], (
            "every record names the bank entries it came from"
        )
        for entry in record["bank_entries"]:
            assert clean_value(entry["value"], 8) in record["prompt"]
        assert record["seed"] == record["settings"]["seed"]
        assert record["prompt_writer"] == "template"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{r['item_id']}.png" for r in records
    )


def test_prompts_follow_the_attribute_bank(chatroom_run, few_refs, tmp_path):
    chatroom_run(few_refs, count=3, output=tmp_path / "a")
    bank = tmp_path / "bank.jsonl"
    bank.write_text(
        "".join(
            json.dumps(
                {
                    "attribute": "garment",
                    "value": f"velvet cape {i}",
                    "reference": p.stem,
                }
            )
            + "\n"
            for i, p in enumerate(sorted(few_refs.iterdir()))
        )
    )
    _, out_b = chatroom_run(
        few_refs,
        count=3,
        output=tmp_path / "b",
        overrides=['extractor.use="static"', f'extractor.file="{bank}"'],
    )
    prompts_a = [r["prompt"] for r in rows(tmp_path / "a" / "prompts.jsonl")]
    prompts_b = [r["prompt"] for r in rows(out_b / "prompts.jsonl")]
    assert prompts_a != prompts_b
    assert all("velvet cape" in p for p in prompts_b)


def test_attribute_frequencies_follow_the_references(few_refs):
    from chatroom.models import AttributeBank, BankEntry
    from chatroom.plan import plan_item

    # two references out of three carry a bag: about two thirds of plans should
    entries = [
        BankEntry(attribute="accessory", value=v, reference=r)
        for r, v in (("a", "bag"), ("b", "bag"), ("c", "none"))
    ]
    bank = AttributeBank(domain="fashion", attributes=["accessory"], entries=entries)
    picks = [plan_item(bank, i, "fp", 0).entries[0].value for i in range(3000)]
    assert abs(picks.count("bag") / 3000 - 2 / 3) < 0.03


def test_over_generation_replaces_rejected_candidates(chatroom_run, few_refs):
    summary, out = chatroom_run(
        few_refs, count=4, overrides=["generator.blank_every=2"]
    )

    assert summary.written == 4
    rejected = rows(out / "rejected.jsonl")
    assert rejected, "even seeds give black images, which image_checks rejects"
    assert all(r["component"] == "image_checks" for r in rejected)
    assert all("black" in r["reason"] for r in rejected)
    assert all(r["seed"] % 2 == 0 for r in rejected)
    assert all(r["seed"] % 2 for r in rows(out / "metadata.jsonl"))


def test_budget_runs_out_with_a_clear_summary(chatroom_run, few_refs):
    summary, out = chatroom_run(
        few_refs, count=4, overrides=["generator.blank_every=1"], max_candidates=6
    )

    assert summary.status == "budget exhausted"
    assert summary.written == 0 and summary.attempted == 6
    assert "budget of 6 candidates" in summary.message
    assert "image_checks" in summary.message and "max_candidates" in summary.message
    assert json.loads((out / "run.json").read_text())["status"] == "budget exhausted"


def test_second_run_generates_nothing(chatroom_run, few_refs):
    chatroom_run(few_refs, count=3)
    FakeGenerator.calls.clear()

    summary, out = chatroom_run(few_refs, count=3)

    assert FakeGenerator.calls == []
    assert summary.written == 3
    assert len(rows(out / "metadata.jsonl")) == 3


def test_a_larger_count_extends_the_run(chatroom_run, few_refs):
    _, out = chatroom_run(few_refs, count=2)
    first = {r["item_id"] for r in rows(out / "metadata.jsonl")}
    FakeGenerator.calls.clear()

    chatroom_run(few_refs, count=4)

    after = {r["item_id"] for r in rows(out / "metadata.jsonl")}
    assert first < after and len(after) == 4
    assert len(FakeGenerator.calls) == 2


def test_changed_config_refuses_to_resume(chatroom_run, few_refs):
    chatroom_run(few_refs, count=2)

    with pytest.raises(ResumeError) as err:
        chatroom_run(few_refs, count=2, overrides=["generator.width=32", "seed=5"])
    message = str(err.value)
    assert "generator.width" in message and "seed" in message and "--fresh" in message

    summary, out = chatroom_run(
        few_refs, count=2, overrides=["generator.width=32", "seed=5"], fresh=True
    )
    assert summary.written == 2
    assert all(r["settings"]["width"] == 32 for r in rows(out / "metadata.jsonl"))


def test_stop_after_prompts_then_edit_then_run_on(chatroom_run, few_refs):
    summary, out = chatroom_run(few_refs, count=3, stop_after="prompts")
    assert summary.status == "stopped after prompts"
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    prompts = rows(out / "prompts.jsonl")
    assert len(prompts) == 3
    prompts[1]["prompt"] = "a hand-edited prompt, red raincoat, (full body:1.3)"
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    FakeGenerator.calls.clear()
    chatroom_run(few_refs, count=3)

    sent = [prompt for prompt, _ in FakeGenerator.calls]
    assert "a hand-edited prompt, red raincoat, (full body:1.3)" in sent
    record = next(r for r in rows(out / "metadata.jsonl") if r["index"] == 1)
    assert record["prompt"].startswith("a hand-edited prompt")
    assert record["prompt_writer"] == "template (edited)"


@pytest.mark.parametrize(
    "value, message",
    [
        ("  ", "prompts.jsonl:2: the prompt of index 1 is empty"),
        (
            7,
            "prompts.jsonl:2: not a prompt row: prompt: Input should be a valid string",
        ),
    ],
)
def test_a_bad_hand_edit_names_its_line(chatroom_run, few_refs, value, message):
    _, out = chatroom_run(few_refs, count=3, stop_after="prompts")
    prompts = rows(out / "prompts.jsonl")
    prompts[1]["prompt"] = value
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    with pytest.raises(ChatroomError, match=message):
        chatroom_run(few_refs, count=3)


def test_stop_after_attributes_then_edit_the_bank(chatroom_run, few_refs):
    _, out = chatroom_run(few_refs, count=2, stop_after="attributes")
    bank = rows(out / "attributes.jsonl")
    assert bank and not (out / "prompts.jsonl").exists()
    for row in bank:
        if row["attribute"] == "garment":
            row["value"] = "sequin jumpsuit"
    (out / "attributes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bank))

    chatroom_run(few_refs, count=2)

    assert all("sequin jumpsuit" in r["prompt"] for r in rows(out / "metadata.jsonl"))


def test_reference_sample_is_seeded(chatroom_run, fashion_refs, tmp_path):
    _, out = chatroom_run(
        fashion_refs,
        count=1,
        reference_sample=4,
        stop_after="attributes",
        output=tmp_path / "a",
    )
    _, again = chatroom_run(
        fashion_refs,
        count=1,
        reference_sample=4,
        stop_after="attributes",
        output=tmp_path / "b",
    )
    used = json.loads((out / "run.json").read_text())["references"]["images"]
    assert len(used) == 4
    assert used == json.loads((again / "run.json").read_text())["references"]["images"]


def test_run_json_records_settings_and_their_sources(chatroom_run, few_refs):
    _, out = chatroom_run(few_refs, count=1, overrides=["generator.height=80"])
    info = json.loads((out / "run.json").read_text())
    settings = info["settings"]
    assert settings["generator.height"] == {"value": 80, "source": "--set"}
    assert settings["generator.use"]["source"].startswith("config:")
    assert settings["prompter.use"] == {"value": "template", "source": "domain:fashion"}
    assert settings["count"]["source"] == "command line"
    assert (
        settings["filters.image_checks.min_std"]["source"] == "default (image_checks)"
    )
    assert info["libraries"]["pydantic"]
    assert info["components"]["generator:generator"]["component"] == "fake"


def test_a_failing_stage_is_recorded_and_the_run_goes_on(
    chatroom_run, few_refs, monkeypatch
):
    original = FakeGenerator.generate

    def flaky(self, specs, seeds):
        if any(seed == 1 for seed in seeds):
            raise RuntimeError("out of memory on seed 1")
        return original(self, specs, seeds)

    monkeypatch.setattr(FakeGenerator, "generate", flaky)
    summary, out = chatroom_run(few_refs, count=3)

    assert summary.written == 3 and summary.failed == 1
    failures = rows(out / "failures.jsonl")
    assert any("out of memory on seed 1" in f["reason"] for f in failures)


def test_unknown_names_get_suggestions(chatroom_run, few_refs):
    with pytest.raises(ChatroomError, match="did you mean 'image_checks'"):
        chatroom_run(few_refs, overrides=['filters.x.use="image_check"'])
    with pytest.raises(ChatroomError, match="unknown option 'min_sdt'.*'min_std'"):
        chatroom_run(few_refs, overrides=["filters.image_checks.min_sdt=3"])
    with pytest.raises(ChatroomError, match="did you mean 'fashion'"):
        chatroom_run(few_refs, domain="fashon")
    with pytest.raises(ChatroomError, match="unknown setting 'cuont'.*'count'"):
        chatroom_run(few_refs, overrides=["cuont=3"])


def test_bad_option_value_names_component_option_and_value(chatroom_run, few_refs):
    with pytest.raises(ChatroomError) as err:
        chatroom_run(few_refs, overrides=['filters.image_checks.min_std="lots"'])
    message = str(err.value)
    assert "filters.image_checks" in message and "min_std" in message
    assert "'lots'" in message and "expected a number" in message


def test_two_runs_cannot_share_a_folder(chatroom_run, few_refs, tmp_path):
    from chatroom.store import lock_folder

    out = tmp_path / "out"
    out.mkdir()
    held = lock_folder(out)
    try:
        with pytest.raises(ResumeError, match="in use by another chatroom run"):
            chatroom_run(few_refs, count=1, output=out)
    finally:
        held.close()
    summary, _ = chatroom_run(few_refs, count=1, output=out)
    assert summary.written == 1


def test_a_folder_of_other_files_is_refused(chatroom_run, few_refs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ResumeError, match="no chatroom run wrote.*thesis.tex"):
        chatroom_run(few_refs, count=1, output=out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_fatal_error_stops_the_run_and_the_same_call_resumes(
    chatroom_run, few_refs, monkeypatch
):
    from chatroom.errors import QuotaExhausted

    original = FakeGenerator.generate
    calls = {"n": 0}

    def quota_after_two(self, specs, seeds):
        calls["n"] += 1
        if calls["n"] > 2:
            raise QuotaExhausted("the provider says the quota is used up")
        return original(self, specs, seeds)

    monkeypatch.setattr(FakeGenerator, "generate", quota_after_two)
    with pytest.raises(QuotaExhausted, match="quota is used up"):
        chatroom_run(few_refs, count=5)
    out = few_refs.parent / "out"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "stopped"
    assert "quota is used up" in info["summary"]["message"]
    assert not (out / "failures.jsonl").read_text().strip()

    monkeypatch.setattr(FakeGenerator, "generate", original)
    summary, _ = chatroom_run(few_refs, count=5)
    assert summary.written == 5 and summary.failed == 0


def test_a_run_from_before_a_plugin_upgrade_resumes(
    chatroom_run, few_refs, monkeypatch
):
    from chatroom.resolve import Resolved

    _, out = chatroom_run(few_refs, count=2)
    info = json.loads((out / "run.json").read_text())
    # as written by a version whose filter did not have this option yet...
    del info["settings"]["filters.image_checks.max_flat_share"]
    (out / "run.json").write_text(json.dumps(info))
    # ...so this version's fingerprint differs from the one the run started with
    monkeypatch.setattr(Resolved, "fingerprint", lambda self, refs: "0123456789abcdef")

    summary, _ = chatroom_run(few_refs, count=3)

    assert summary.written == 3
    after = json.loads((out / "run.json").read_text())
    assert after["fingerprint"] == info["fingerprint"]


def test_changed_references_refuse_to_resume(chatroom_run, few_refs):
    chatroom_run(few_refs, count=1)
    next(few_refs.iterdir()).unlink()
    with pytest.raises(ResumeError, match="references or domain pack"):
        chatroom_run(few_refs, count=1)


def test_fresh_never_deletes_files_a_run_did_not_write(
    chatroom_run, few_refs, tmp_path
):
    out = tmp_path / "mine"
    (out / "images" / "sub").mkdir(parents=True)
    (out / "images" / "sub" / "holiday.png").write_bytes(b"precious")
    (out / "metadata.jsonl").write_text('{"file_name": "mine"}\n')

    with pytest.raises(ResumeError, match="no chatroom run wrote"):
        chatroom_run(few_refs, count=1, output=out, fresh=True)

    assert (out / "images" / "sub" / "holiday.png").read_bytes() == b"precious"
    assert (out / "metadata.jsonl").read_text() == '{"file_name": "mine"}\n'


def test_the_references_folder_is_not_an_output_folder(chatroom_run, few_refs):
    with pytest.raises(ChatroomError, match="holds the references"):
        chatroom_run(few_refs, count=1, output=few_refs, fresh=True)
    with pytest.raises(ChatroomError, match="holds the references"):
        chatroom_run(few_refs, count=1, output=few_refs.parent)


def test_an_edited_prompts_file_with_a_repeated_index_is_refused(
    chatroom_run, few_refs
):
    _, out = chatroom_run(few_refs, count=2, stop_after="prompts")
    prompts = rows(out / "prompts.jsonl")
    prompts[1]["index"] = 0
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    with pytest.raises(ChatroomError, match=r"prompts.jsonl:2: index 0 appears twice"):
        chatroom_run(few_refs, count=2)


def test_bad_generic_values_are_refused(chatroom_run, few_refs):
    with pytest.raises(
        ChatroomError, match="enabled = 'maybe': expected true or false"
    ):
        chatroom_run(few_refs, overrides=['annotators.captions.enabled="maybe"'])
    with pytest.raises(ChatroomError, match="setting 'seed' = -5"):
        chatroom_run(few_refs, overrides=["seed=-5"])


def test_fresh_starts_afresh_with_the_same_settings(chatroom_run, few_refs):
    _, out = chatroom_run(few_refs, count=2)
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("an old report")
    FakeGenerator.calls.clear()

    summary, _ = chatroom_run(few_refs, count=2, fresh=True)

    assert summary.written == 2 and len(FakeGenerator.calls) == 2
    assert not (out / "report").exists()


class Broken(Filter):
    name = "broken"
    description = "raises on every batch"

    def check(self, candidates):
        raise ValueError("boom")


class OffersBroken:
    @hookimpl
    def register_filters(self, register):
        register(Broken)


def test_when_every_candidate_fails_the_summary_says_so_not_raise_the_budget(
    chatroom_run, chatroom_plugins, few_refs
):
    chatroom_plugins.register(OffersBroken(), name="broken")
    summary, _ = chatroom_run(
        few_refs, count=2, overrides=['filters.b.use="broken"', "max_candidates=4"]
    )
    assert summary.status == "budget exhausted" and summary.failed == 4
    assert summary.message == (
        "every one of the 4 candidates failed, 4 with: ValueError: boom; "
        "see failures.jsonl"
    )
