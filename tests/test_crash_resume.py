"""Runs killed with SIGKILL at chosen moments resume with nothing lost or doubled."""

import json
import subprocess
import sys
import textwrap

import pytest

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from chatroom import engine, store
    from chatroom.resolve import Request
    from chatroom.testing import FAKE_CONFIG, FakeGenerator, fake_plugins

    refs, out, count, point, nth = sys.argv[1:6]
    nth = int(nth)
    calls = {"n": 0}

    def kill_on_nth():
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "generate":
        original = FakeGenerator.generate
        def generate(self, specs, seeds):
            kill_on_nth()
            return original(self, specs, seeds)
        FakeGenerator.generate = generate
    elif point in ("image-tmp", "image-placed"):
        original = store.atomic_write_bytes
        def atomic(path, data):
            if "images" in str(path) and point == "image-tmp":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(path).parent / (store.TMP_PREFIX + "x")
                tmp.write_bytes(data[: len(data) // 2])
                kill_on_nth()
            original(path, data)
            if "images" in str(path) and point == "image-placed":
                kill_on_nth()
        store.atomic_write_bytes = atomic
    elif point in ("metadata", "prompts"):
        original = engine.Engine._append
        def append(self, name, row):
            if name.startswith(point) and calls["n"] + 1 == nth:
                with open(self.out / name, "a") as fh:
                    fh.write(json.dumps(row)[:40])  # half a line, then killed
                    fh.flush()
            if name.startswith(point):
                kill_on_nth()
            original(self, name, row)
        engine.Engine._append = append

    config = Path(out).parent / "fake.toml"
    config.write_text(FAKE_CONFIG + "\\n[filters.image_checks]\\nmin_std = 2.0\\n")
    request = Request(str(config), {"references": refs, "count": int(count),
                                    "output": out}, ["generator.blank_every=3"])
    summary = engine.Engine(request, plugins=fake_plugins()).run()
    print(json.dumps({"written": summary.written, "calls": len(FakeGenerator.calls)}))
    """
)


def drive(tmp_path, refs, out, count, point="none", nth=0):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run(
        [sys.executable, str(script), str(refs), str(out), str(count), point, str(nth)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_folder(out, count):
    """Exactly ``count`` records, every file present, no orphans or duplicates."""
    records = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    ids = [r["item_id"] for r in records]
    assert len(records) == count
    assert len(set(ids)) == count
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(f"{i}.png" for i in ids)
    assert not list(out.rglob(".tmp-*"))
    for r in records:
        from PIL import Image

        with Image.open(out / r["file_name"]) as img:
            img.load()
    rejected = [
        json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()
    ]
    seen = ids + [r["item_id"] for r in rejected]
    assert len(seen) == len(set(seen)), "an item is both written and rejected, or twice"
    prompts = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    indices = [p["index"] for p in prompts]
    assert len(indices) == len(set(indices))


@pytest.mark.parametrize(
    "point,nth",
    [
        ("generate", 3),
        ("image-tmp", 2),
        ("image-placed", 4),
        ("metadata", 3),
        ("prompts", 2),
    ],
)
def test_killed_run_resumes_exactly(tmp_path, few_refs, point, nth):
    out = tmp_path / "out"

    killed = drive(tmp_path, few_refs, out, 6, point, nth)
    assert killed.returncode == -9, killed.stderr[-2000:]

    resumed = drive(tmp_path, few_refs, out, 6)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_folder(out, 6)

    again = drive(tmp_path, few_refs, out, 6)
    assert json.loads(again.stdout.strip().splitlines()[-1])["calls"] == 0
    check_folder(out, 6)


def test_killed_twice_in_a_row(tmp_path, few_refs):
    out = tmp_path / "out"
    assert drive(tmp_path, few_refs, out, 6, "generate", 2).returncode == -9
    assert drive(tmp_path, few_refs, out, 6, "image-placed", 2).returncode == -9
    assert drive(tmp_path, few_refs, out, 6).returncode == 0
    check_folder(out, 6)


def test_a_users_files_in_the_data_folders_survive_a_kill_and_resume(
    tmp_path, few_refs
):
    out = tmp_path / "out"
    assert drive(tmp_path, few_refs, out, 6, "image-placed", 2).returncode == -9
    users = {"images/keep.txt": b"notes", "masks/mine/hand_mask.png": b"a mask"}
    for rel, data in users.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)

    assert drive(tmp_path, few_refs, out, 6).returncode == 0

    for rel, data in users.items():
        assert (out / rel).read_bytes() == data
        (out / rel).unlink()
    check_folder(out, 6)  # and the killed write's half-placed image is gone
