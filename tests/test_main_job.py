"""The main job through the command line, on the smoke models and the shared photos."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHATROOM = [sys.executable, "-m", "chatroom.cli"]


def chatroom(*args, cwd=None, timeout=300):
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(
        [*CHATROOM, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    result = chatroom("smoke-models", models)
    assert result.returncode == 0, result.stderr
    config = models / "smoke.toml"
    assert config.is_file()
    return config


def rows(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_args(smoke, refs, out, count=8, *extra):
    return [
        "run",
        "-c",
        smoke,
        "--domain",
        "fashion",
        "--references",
        refs,
        "-n",
        count,
        "-o",
        out,
        *extra,
    ]


def check_dataset(out: Path, count: int):
    records = rows(out / "metadata.jsonl")
    ids = [r["item_id"] for r in records]
    assert len(records) == count and len(set(ids)) == count
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{i}.png" for i in ids
    )
    assert not list(out.rglob(".tmp-*"))
    return records


def test_main_job_writes_an_imagefolder_dataset(smoke, fashion_refs, tmp_path):
    out = tmp_path / "out"
    result = chatroom(*run_args(smoke, fashion_refs, out))
    assert result.returncode == 0, result.stderr
    assert "complete: 8/8 records" in result.stderr

    records = check_dataset(out, 8)
    for record in records:
        assert record["caption"], "every record has a caption"
        assert record["references"] and all(
            (fashion_refs / f"{r}.jpg").exists() or (fashion_refs / f"{r}.png").exists()
            for r in record["references"]
        )
        assert record["bank_entries"] and all(
            e["reference"] in record["references"] for e in record["bank_entries"]
        )
        assert record["settings"]["clip_skip"] == 2
        assert record["settings"]["sampler"] == "DPM++ 2M SDE Karras"

    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 8
    assert {
        "image",
        "caption",
        "prompt",
        "seed",
        "references",
        "bank_entries",
        "settings",
        "attributes",
    } <= set(ds.column_names)
    assert ds[0]["image"].size == (128, 192)  # 64x96 with hires x2

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    # Random weights judge nothing: every content-judging component only observes,
    # and the other packs' filters (scoped by `domains`) stay out of a fashion run.
    assert sorted(info["observe"]["components"]) == [
        "annotator:captions",
        "annotator:graphonomy",
        "filter:clip_nsfw",
        "filter:openpose",
        "filter:quality",
    ]
    assert info["settings"]["generator.cfg_scale"]["value"] == 4.0
    assert info["components"]["generator:generator"]["diffusers"]


def wait_for(predicate, proc, limit=240):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def count_images(out: Path) -> int:
    folder = out / "images"
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def test_sigkill_at_several_points_then_resume(smoke, fashion_refs, tmp_path):
    out = tmp_path / "out"
    args = [*CHATROOM, *map(str, run_args(smoke, fashion_refs, out))]

    # killed while the models load or the first images are generated, then mid-run
    for threshold in (0, 1, 4, 6):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if threshold == 0:
            reached = wait_for(lambda: (out / "prompts.jsonl").exists(), proc)
        else:
            reached = wait_for(lambda t=threshold: count_images(out) >= t, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert reached or proc.returncode == 0, proc.stderr.read().decode()[-2000:]

    result = chatroom(*run_args(smoke, fashion_refs, out))
    assert result.returncode == 0, result.stderr
    check_dataset(out, 8)

    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = chatroom(*run_args(smoke, fashion_refs, out))
    assert again.returncode == 0
    assert "complete: 8/8 records" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before


def test_stop_after_prompts_edit_and_run_on(smoke, fashion_refs, tmp_path):
    out = tmp_path / "out"
    first = chatroom(*run_args(smoke, fashion_refs, out, 3, "--stop-after", "prompts"))
    assert first.returncode == 0, first.stderr
    prompts = rows(out / "prompts.jsonl")
    assert len(prompts) == 3
    prompts[0]["prompt"] = "edited by hand, green trench coat, (full body:1.3)"
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    second = chatroom(*run_args(smoke, fashion_refs, out, 3))
    assert second.returncode == 0, second.stderr

    record = next(r for r in rows(out / "metadata.jsonl") if r["index"] == 0)
    assert record["prompt"] == "edited by hand, green trench coat, (full body:1.3)"
    assert record["received_prompt"].startswith("edited by hand")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--references", "{tmp}/nowhere"], "references folder not found"),
        (["--references", "{tmp}/empty"], "references folder is empty"),
        (["--domain", "fashon"], "unknown domain 'fashon' (did you mean 'fashion'?)"),
        (["--set", 'generator.use="difusers"'], "did you mean 'diffusers'"),
        (["--set", "generator.steps=many"], "generator (diffusers): option 'steps'"),
        (["--set", 'generator.sampler="DPM++ 9M"'], "DPM++ 2M Karras"),
        (["-o", "{tmp}/file.txt/out"], "output folder cannot be written"),
        (["-c", "{tmp}/missing.toml"], "config file not found"),
    ],
)
def test_bad_input_is_one_clear_line(smoke, fashion_refs, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    base = {
        "-c": str(smoke),
        "--references": str(fashion_refs),
        "-o": str(tmp_path / "out"),
        "--domain": "fashion",
    }
    extra = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in base:
            base[flag] = value
    overrides = [
        x
        for pair in zip(extra[::2], extra[1::2], strict=True)
        if pair[0] == "--set"
        for x in pair
    ]
    argv = ["run", "-n", "1"] + [x for kv in base.items() for x in kv] + overrides

    result = chatroom(*argv)

    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_doctor_reports_each_backend(smoke, monkeypatch):
    result = chatroom("doctor", "-c", smoke)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("extractor:extractor", "generator:generator", "annotator:captions"):
        assert name in result.stdout
    assert "weights model" in result.stdout and "MISSING" not in result.stdout

    broken = smoke.parent / "broken.toml"
    shutil.copy(smoke, broken)
    text = broken.read_text().replace(str(smoke.parent / "sd15"), "/nonexistent/sd15")
    broken.write_text(text)
    result = chatroom("doctor", "-c", broken)
    assert result.returncode == 1
    assert "not found: /nonexistent/sd15" in result.stdout


def test_secrets_never_reach_run_json(smoke, fashion_refs, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    result = subprocess.run(
        [
            *CHATROOM,
            *map(str, run_args(smoke, fashion_refs, out, 1)),
            "--stop-after",
            "attributes",
            "--set",
            'extractor.api_key="sk-live-123"',
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    # the extractor has no api_key option: the error names it but not its value
    assert result.returncode != 0
    assert "api_key" in result.stderr and "sk-live-123" not in result.stderr


def test_doctor_without_a_config_says_what_to_provide():
    result = chatroom("doctor", "--domain", "fashion")
    assert result.returncode == 1
    assert "set generator.model" in result.stdout
    assert "not in the local cache" in result.stdout or "ok: local" in result.stdout


@pytest.mark.parametrize("domain", ["furniture", "architecture"])
def test_other_domains_run_on_their_photos(smoke, tmp_path, domain):
    from conftest import REFERENCES
    from PIL import Image

    from chatroom.domain import load_pack

    out = tmp_path / domain
    result = chatroom(
        "run",
        "-c",
        smoke,
        "--domain",
        domain,
        "--references",
        REFERENCES / domain,
        "-n",
        2,
        "-o",
        out,
    )
    assert result.returncode == 0, result.stderr

    records = check_dataset(out, 2)
    info = json.loads((out / "run.json").read_text())
    assert info["domain"]["name"] == domain
    pack = load_pack(info["domain"]["path"])
    assert all(r["bank_entries"] for r in records)
    for record in records:
        assert record["negative_prompt"] == pack.negative_prompt
        for reference in record["references"]:
            assert any((REFERENCES / domain).glob(f"{reference}*")), reference

    # the pack's own filters observe the noise; its maps and masks are in every record
    checks = {"furniture": "single_object", "architecture": "no_people"}[domain]
    maps = {"furniture": {"object", "depth"}, "architecture": {"edges", "depth"}}
    for record in records:
        assert any(v["filter"] == checks and v["observed"] for v in record["verdicts"])
        assert maps[domain] <= set(record["masks"])
        for name in maps[domain]:
            with Image.open(out / record["masks"][name]) as mask:
                assert mask.size == (128, 192) and mask.mode == "L"

    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 2 and "masks" in ds.column_names
