"""Every hook, called by a real run: in-process plugins that record what they receive."""

import json
from pathlib import Path

from chatroom.components import Filter, Prompter
from chatroom.engine import RunContext, RunSummary
from chatroom.hookspecs import hookimpl
from chatroom.models import PromptSpec, Record, Verdict


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Recorder:
    """Implements the lifecycle hooks and keeps every call."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def run_started(self, run):
        self.calls.append(("run_started", run, None))

    @hookimpl
    def record_written(self, run, record):
        self.calls.append(("record_written", run, record))

    @hookimpl
    def run_finished(self, run, summary):
        self.calls.append(("run_finished", run, summary))

    def named(self, hook):
        return [call for call in self.calls if call[0] == hook]


def test_lifecycle_hooks_see_the_run_each_record_and_the_summary(
    chatroom_plugins, chatroom_run, few_refs
):
    recorder = Recorder()
    chatroom_plugins.register(recorder, name="recorder")

    summary, out = chatroom_run(few_refs, count=3)

    started = recorder.named("run_started")
    assert len(started) == 1
    run = started[0][1]
    assert isinstance(run, RunContext)
    assert run.output == out
    assert run.settings.count == 3 and run.domain.name == "fashion"

    written = recorder.named("record_written")
    assert len(written) == 3
    assert all(isinstance(call[2], Record) for call in written)
    assert all(call[1] is run for call in written)
    item_ids = [r["item_id"] for r in rows(out / "metadata.jsonl")]
    assert sorted(call[2].item_id for call in written) == sorted(item_ids)
    for call in written:
        assert (out / call[2].file_name).is_file(), "files exist before the hook"

    finished = recorder.named("run_finished")
    assert len(finished) == 1
    assert finished[0][1] is run
    assert isinstance(finished[0][2], RunSummary)
    assert finished[0][2].written == summary.written == 3
    assert [call[0] for call in recorder.calls][0] == "run_started"
    assert [call[0] for call in recorder.calls][-1] == "run_finished"


def test_a_resumed_run_announces_no_record_twice(
    chatroom_plugins, chatroom_run, few_refs
):
    recorder = Recorder()
    chatroom_plugins.register(recorder, name="recorder")

    chatroom_run(few_refs, count=2)
    chatroom_run(few_refs, count=3)

    assert len(recorder.named("run_started")) == 2
    assert len(recorder.named("run_finished")) == 2
    ids = [call[2].item_id for call in recorder.named("record_written")]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_run_finished_is_called_when_the_budget_runs_out(
    chatroom_plugins, chatroom_run, few_refs
):
    recorder = Recorder()
    chatroom_plugins.register(recorder, name="recorder")

    chatroom_run(
        few_refs, count=2, overrides=["generator.blank_every=1"], max_candidates=3
    )

    assert recorder.named("record_written") == []
    (finished,) = recorder.named("run_finished")
    assert finished[2].status == "budget exhausted"
    assert finished[2].written == 0 and finished[2].rejected == 3


class OddIndexFilter(Filter):
    name = "odd_index"
    description = "rejects every item with an odd index"

    def check(self, candidates):
        return [
            Verdict(passed=c.index % 2 == 0, reason="odd index" if c.index % 2 else "")
            for c in candidates
        ]


class FixedPrompter(Prompter):
    name = "fixed"
    description = "the same prompt for every item"

    def write(self, items, domain):
        return [
            PromptSpec(
                index=item.index,
                item_id=item.item_id,
                prompt=f"a plain {domain.word} photo",
                negative_prompt="blurry",
                writer=self.name,
            )
            for item in items
        ]


class Offers:
    """Offers a filter, a prompter and a domain pack through the registration hooks."""

    def __init__(self, pack: Path):
        self.pack = pack

    @hookimpl
    def register_filters(self, register):
        register(OddIndexFilter)

    @hookimpl
    def register_prompters(self, register):
        register(FixedPrompter)

    @hookimpl
    def register_domains(self, register):
        register(self.pack)


def write_pack(folder: Path) -> Path:
    folder.mkdir()
    (folder / "pack.toml").write_text(
        """
name = "pebbles"
word = "pebble"
subject = "stone"

[questions]
key_attributes = "What are the key attributes of a pebble?"
attributes = [{ name = "shape", question = "What shape is the stone?" }]
captions = ["Describe the stone."]

[prompts]
template = "a photo of a ${shape} pebble"
negative = "blurry"

[settings.prompter]
use = "template"
"""
    )
    return folder


def test_registration_hooks_offer_components_and_packs(chatroom_plugins, tmp_path):
    pack = write_pack(tmp_path / "pebbles")
    chatroom_plugins.register(Offers(pack), name="offers")

    assert chatroom_plugins.component("filter", "odd_index") is OddIndexFilter
    assert chatroom_plugins.component("prompter", "fixed") is FixedPrompter
    assert chatroom_plugins.domains["pebbles"] == pack
    assert chatroom_plugins.owner("filter", "odd_index") == "offers"


def test_a_registered_filter_and_prompter_take_part_in_a_run(
    chatroom_plugins, chatroom_run, few_refs, tmp_path
):
    chatroom_plugins.register(Offers(write_pack(tmp_path / "pebbles")), name="offers")

    summary, out = chatroom_run(
        few_refs,
        count=3,
        overrides=['filters.odd.use="odd_index"', 'prompter.use="fixed"'],
    )

    assert summary.written == 3
    records = rows(out / "metadata.jsonl")
    assert all(r["index"] % 2 == 0 for r in records)
    assert {r["prompt"] for r in records} == {"a plain fashion photo"}
    assert {r["prompt_writer"] for r in records} == {"fixed"}
    rejected = rows(out / "rejected.jsonl")
    assert rejected and {r["component"] for r in rejected} == {"odd"}
    assert all(r["reason"] == "odd index" for r in rejected)


def test_a_registered_domain_pack_runs_by_name(
    chatroom_plugins, chatroom_run, few_refs, tmp_path
):
    chatroom_plugins.register(Offers(write_pack(tmp_path / "pebbles")), name="offers")

    summary, out = chatroom_run(few_refs, count=2, domain="pebbles")

    assert summary.written == 2
    assert json.loads((out / "run.json").read_text())["domain"]["name"] == "pebbles"
    for record in rows(out / "metadata.jsonl"):
        assert record["prompt"].startswith("a photo of a shape of ")
        assert set(record["attributes"]) == {"shape"}
