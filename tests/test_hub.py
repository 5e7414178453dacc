"""Pushing a finished run to a Hugging Face Hub, here a fake one on 127.0.0.1."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from fakes.hub_server import FakeHubServer
from PIL import Image

from chatroom import hub as chatroom_hub
from chatroom.components import Annotator
from chatroom.errors import ChatroomError, InputError
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation

# huggingface_hub passes raw bytes to httpx2 the way httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"
)
COUNT = 7
TOKEN = "hf_TestSecretToken0123456789"
REPO = "lab/shirts"
LICENCES = {
    # file stem -> the licence the references folder names (the third has none)
    0: ("CC BY-NC-SA 4.0", "https://example.org/dresscode"),
    1: ("Apache-2.0", "https://example.org/ccp"),
}


class Masker(Annotator):
    """Two part masks and one keypoint on every item."""

    name = "hub-masker"
    description = "two flat masks and a keypoint"

    def annotate(self, candidates, verdicts):
        size = candidates[0].image.size if candidates else (1, 1)
        return [
            Annotation(
                annotator="m",
                masks={
                    "upper": Image.new("L", size, 255),
                    "lower": Image.new("L", size, 0),
                },
                keypoints=[[10.0, 20.0, 0.9]],
            )
            for _ in candidates
        ]


class OffersMasker:
    @hookimpl
    def register_annotators(self, register):
        register(Masker)


@pytest.fixture
def refs_with_licences(few_refs):
    rows = []
    for number, path in enumerate(sorted(few_refs.iterdir())):
        if number in LICENCES:
            licence, source = LICENCES[number]
            rows.append({"file_name": path.name, "license": licence, "source": source})
    (few_refs / "metadata.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows)
    )
    return few_refs


@pytest.fixture
def run7(chatroom_run, chatroom_plugins, refs_with_licences):
    """A finished run of seven masked records from licensed references."""
    chatroom_plugins.register(OffersMasker(), name="hub-masker")
    summary, out = chatroom_run(
        refs_with_licences, count=COUNT, overrides=['annotators.m.use="hub-masker"']
    )
    assert summary.status == "complete"
    return out


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, with the token in HF_TOKEN and Xet off (the fake has none)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHubServer(tokens={TOKEN: "alice"}, orgs={"alice": ["lab"]}) as server:
        yield server


def push(run, server, tmp_path, **options):
    options.setdefault("dest", tmp_path / "export")
    options.setdefault("shard_size", 3)
    options.setdefault("retry_wait", 0)
    return chatroom_hub.push_to_hub(run, REPO, endpoint=server.url, **options)


def split_card(text):
    assert text.startswith("---\n")
    header, sep, body = text[4:].partition("\n---\n")
    assert sep, "the card's metadata header is not closed"
    return yaml.safe_load(header), body


def test_push_sends_every_shard_the_manifest_and_the_card(run7, hub, tmp_path):
    import pyarrow.parquet as pq

    result = push(run7, hub, tmp_path, private=True)

    files = hub.files(REPO)
    shards = [f"data/shard-{n:05d}.parquet" for n in range(3)]
    assert sorted(files) == sorted(
        [".gitattributes", "README.md", "data/_manifest.json", *shards]
    )
    assert hub.repos[REPO].private
    for shard in result.export.shards:
        local = (result.export.dest / shard["name"]).read_bytes()
        assert files[f"data/{shard['name']}"] == local
        assert hashlib.sha256(local).hexdigest() == shard["sha256"]

    # The shards went through the git-LFS basic transfer, each once; no Xet.
    assert sorted(hub.uploads) == sorted(s["sha256"] for s in result.export.shards)
    assert set(hub.uploads.values()) == {1}
    assert "xet_token" not in hub.routes()

    manifest = json.loads(files["data/_manifest.json"])
    assert manifest["records"] == COUNT
    assert manifest["run"]["path"] == run7.name  # no local path on the Hub
    assert [s["name"] for s in manifest["shards"]] == [s[5:] for s in shards]

    table = pq.read_table(io.BytesIO(files[shards[0]]))
    assert table.num_rows == 3 and "image" in table.column_names
    assert files["README.md"].decode() == result.card
    assert result.url == f"{hub.url}/datasets/{REPO}"


def test_the_card_names_the_licences_and_tells_the_lineage(run7, hub, tmp_path):
    push(run7, hub, tmp_path)
    meta, body = split_card(hub.files(REPO)["README.md"].decode())

    # The Hub's metadata: licence ids of the references, tasks, size, data files.
    assert meta["license"] == ["apache-2.0", "cc-by-nc-sa-4.0", "unknown"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == [
        "text-to-image",
        "image-segmentation",
        "keypoint-detection",
    ]
    assert meta["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/shard-*.parquet"}],
        }
    ]
    assert "fashion" in meta["tags"]

    # The body: each reference's licence as written, and its source.
    assert "CC BY-NC-SA 4.0" in body and "Apache-2.0" in body
    assert "https://example.org/dresscode" in body
    assert "not stated" in body  # the third reference names no licence
    info = json.loads((run7 / "run.json").read_text())
    for ref in info["references"]["images"]:
        assert ref["sha256"][:16] in body
        assert ref["path"] not in body  # local paths stay local

    # The lineage, the models, the funnel and the settings.
    for step in ("Reference images", "Attributes", "Prompts", "Settings"):
        assert f"**{step}**" in body
    assert "**Filters**" in body and "**Annotations**" in body
    assert "`hub-masker`" in body and "`image_checks`" in body
    assert f"| **rows in this dataset** | **{COUNT}** | |" in body
    assert "| `generator.width` | 64 |" in body
    assert str(run7) not in body


def test_the_licence_can_be_chosen(run7, hub, tmp_path):
    push(run7, hub, tmp_path, license="cc-by-nc-4.0")
    meta, body = split_card(hub.files(REPO)["README.md"].decode())
    assert meta["license"] == "cc-by-nc-4.0"
    assert "CC BY-NC-SA 4.0" in body  # the references' own terms are still told


def test_secrets_in_the_settings_are_redacted_in_the_card(run7, hub, tmp_path):
    info = json.loads((run7 / "run.json").read_text())
    info["settings"]["prompter.api_key"] = {"value": "sk-live-42", "source": "config"}
    (run7 / "run.json").write_text(json.dumps(info))

    push(run7, hub, tmp_path)

    card = hub.files(REPO)["README.md"].decode()
    assert "sk-live-42" not in card
    assert '| `prompter.api_key` | "<redacted>" |' in card


def test_the_card_lists_models_with_the_hashes_in_run_json(run7, hub, tmp_path):
    info = json.loads((run7 / "run.json").read_text())
    info["components"]["generator:generator"].update(
        model="/models/majicmixRealistic_v6.safetensors",
        sha256="e4a30e4607" + "0" * 54,
    )
    (run7 / "run.json").write_text(json.dumps(info))

    push(run7, hub, tmp_path)

    card = hub.files(REPO)["README.md"].decode()
    row = next(line for line in card.splitlines() if line.startswith("| generator |"))
    assert "majicmixRealistic_v6.safetensors" in row and "/models/" not in row
    assert "e4a30e4607" + "0" * 54 in row


def test_the_token_reaches_no_file_and_no_request_body(run7, hub, tmp_path):
    push(run7, hub, tmp_path)
    for path, data in hub.files(REPO).items():
        assert TOKEN.encode() not in data, path
    assert not [body for body in hub.bodies if TOKEN.encode() in body]


def test_a_second_push_uploads_nothing_again(run7, hub, tmp_path):
    assert push(run7, hub, tmp_path).changed
    uploads = dict(hub.uploads)
    again = push(run7, hub, tmp_path)
    assert not again.changed
    assert dict(hub.uploads) == uploads
    assert hub.commits(REPO) == 2  # the repo's first commit and one push


def test_a_push_with_fewer_shards_deletes_the_stale_ones(run7, hub, tmp_path):
    push(run7, hub, tmp_path, shard_size=3)
    result = push(run7, hub, tmp_path, shard_size=5)

    assert result.deleted == ["data/shard-00002.parquet"]
    data = sorted(p for p in hub.files(REPO) if p.startswith("data/shard-"))
    assert data == ["data/shard-00000.parquet", "data/shard-00001.parquet"]


def test_a_branch_other_than_main_is_made(run7, hub, tmp_path):
    result = push(run7, hub, tmp_path, revision="v1")
    assert result.revision == "v1"
    assert "README.md" in hub.files(REPO, "v1")
    assert "README.md" not in hub.files(REPO, "main")


def test_a_bad_token_gives_one_line_without_the_token(run7, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_WrongToken999")
    with pytest.raises(ChatroomError) as caught:
        push(run7, hub, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "401" in message and "HF_TOKEN" in message
    assert "hf_WrongToken999" not in message


def test_no_token_is_refused_before_anything_is_sent(run7, hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(InputError, match="set HF_TOKEN"):
        push(run7, hub, tmp_path)
    assert hub.requests == []


def test_a_namespace_the_token_may_not_write_gives_403(run7, hub, tmp_path):
    with pytest.raises(ChatroomError, match=r"may not write to other/shirts \(403"):
        chatroom_hub.push_to_hub(
            run7, "other/shirts", dest=tmp_path / "x", endpoint=hub.url, retry_wait=0
        )


def test_a_bad_repo_id_is_refused(run7, hub, tmp_path):
    with pytest.raises(InputError, match="use ORG/NAME"):
        chatroom_hub.push_to_hub(run7, "shirts", endpoint=hub.url)


def test_server_errors_are_tried_again(run7, hub, tmp_path):
    hub.faults += [("create", 503), ("commit", 502)]
    push(run7, hub, tmp_path)
    assert hub.routes().count("create") == 2
    assert hub.routes().count("commit") == 2
    assert "README.md" in hub.files(REPO)


def test_a_hub_that_keeps_failing_gives_one_line(run7, hub, tmp_path):
    hub.faults += [("commit", 503)] * 3
    with pytest.raises(ChatroomError) as caught:
        push(run7, hub, tmp_path, tries=3)
    message = str(caught.value)
    assert "\n" not in message
    assert "answered 503 while committing the files, 3 times" in message
    assert "README.md" not in hub.files(REPO)


def test_a_hub_that_cannot_be_reached_gives_one_line(run7, hub, tmp_path):
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ChatroomError) as caught:
        chatroom_hub.push_to_hub(
            run7, REPO, dest=tmp_path / "x", endpoint=f"http://127.0.0.1:{port}",
            tries=2, retry_wait=0,
        )  # fmt: skip
    message = str(caught.value)
    assert message.startswith(f"cannot reach the Hub at http://127.0.0.1:{port}")
    assert "2 tries" in message and "\n" not in message


def test_xet_against_a_server_without_it_says_what_to_set(
    run7, hub, tmp_path, monkeypatch
):
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(ChatroomError, match=r"set HF_HUB_DISABLE_XET=1\)$"):
        push(run7, hub, tmp_path, tries=1)
    assert "xet_token" in hub.routes() and not hub.uploads


def test_a_conflict_gives_one_line(run7, hub, tmp_path):
    hub.faults.append(("commit", 409))
    with pytest.raises(ChatroomError, match=r"409 Conflict.*run the command again"):
        push(run7, hub, tmp_path)


def test_offline_mode_gives_one_line(run7, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ChatroomError, match="^HF_HUB_OFFLINE is set"):
        push(run7, hub, tmp_path)
    assert hub.requests == []


# --- the command line -------------------------------------------------------------


def cli_env(server, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"),  # no saved login is read
        **extra,
    )
    return env


def chatroom_cli(*args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "chatroom.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_cli_pushes_with_the_token_from_a_named_variable(run7, hub, tmp_path):
    env = cli_env(hub, tmp_path, MY_HUB_TOKEN=TOKEN)
    args = ["export", str(run7), "--format", "hub", "--repo", REPO]
    result = chatroom_cli(
        *args, "--token-env", "MY_HUB_TOKEN", "--shard-size", "3", env=env, cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"pushed {COUNT} records in 3 shards and a dataset card to "
        f"{hub.url}/datasets/{REPO}"
    )
    assert TOKEN not in result.stdout + result.stderr
    assert "README.md" in hub.files(REPO)
    assert (tmp_path / f"{run7.name}-parquet" / "_manifest.json").is_file()

    # Verbose logging shows no token either.
    again = chatroom_cli(
        "-vv", *args, "--token-env", "MY_HUB_TOKEN", env=env, cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert TOKEN not in again.stdout + again.stderr


def test_cli_bad_token_is_one_line_and_exit_2(run7, hub, tmp_path):
    env = cli_env(hub, tmp_path, HF_TOKEN="hf_NotTheRightOne")
    result = chatroom_cli(
        "export", str(run7), "--format", "hub", "--repo", REPO, env=env, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: the Hub at 127.0.0.1:")
    assert "401 Unauthorized" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hf_NotTheRightOne" not in result.stdout + result.stderr


def test_cli_hub_options_need_the_hub_format(run7, tmp_path):
    result = chatroom_cli(
        "export", str(run7), "--format", "parquet", "--repo", REPO,
        env=dict(os.environ), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--repo only go with --format hub" in result.stderr


def test_an_interrupted_push_completes_when_run_again(run7, hub, tmp_path):
    env = cli_env(hub, tmp_path, HF_TOKEN=TOKEN)
    args = [sys.executable, "-m", "chatroom.cli", "export", str(run7)]
    args += ["--format", "hub", "--repo", REPO, "--shard-size", "2"]

    # The first push stalls after one shard is stored; then it is killed.
    hub.hold_uploads_after = 1
    first = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert hub.holding.wait(90), "the push never reached the LFS uploads"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    stored = set(hub.uploads)
    assert 1 <= len(stored) < 4
    assert hub.commits(REPO) == 1  # nothing committed: only the repo's first commit

    hub.hold_uploads_after = None
    hub.release.set()
    result = chatroom_cli(*args[3:], env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    shards = [f"data/shard-{n:05d}.parquet" for n in range(4)]
    assert set(shards) <= set(hub.files(REPO))
    assert len(hub.uploads) == 4
    assert set(hub.uploads.values()) == {1}  # what was stored was not sent again
