"""The Ray executor: same records as the local one, actors that die, resumed runs.

Ray listens on every interface, so each run that starts it goes in a fresh network
namespace (``unshare -n``, then loopback up) in a subprocess of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from chatroom.errors import ConfigError
from chatroom.executors import RayExecutor, ray_temp_dir
from chatroom.resolve import Request, resolve
from chatroom.testing import fake_plugins

COUNT = 20

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from pathlib import Path
    from chatroom import engine
    from chatroom.hookspecs import hookimpl
    from chatroom.manager import Plugins
    from chatroom.plugins.diffusers_generator import DiffusersGenerator
    from chatroom.resolve import Request

    config, refs, out, count, executor, mode = sys.argv[1:7]
    count = int(count)
    overrides = sys.argv[7:]
    MARKER = Path(out).parent / "stalled-batch"
    state = {}

    class StallOnce(DiffusersGenerator):
        # The diffusers generator, but the first try of item 5 stalls: the test
        # kills the actor while that batch runs.
        name = "stall_once"

        def generate(self, specs, seeds):
            if specs[0].index == 5 and not MARKER.exists():
                MARKER.write_text(str(os.getpid()))
                time.sleep(120)
            return super().generate(specs, seeds)

    class StallPlugin:
        @hookimpl
        def register_generators(self, register):
            register(StallOnce)

    plugins = Plugins()
    plugins.register(StallPlugin(), name="stall")

    def kill_stalled_actor(run):
        while not MARKER.exists() or not MARKER.read_text():
            time.sleep(0.05)
        pid = int(MARKER.read_text())
        assert pid in run.executor.pids("generator"), "the actor's own pid"
        os.kill(pid, signal.SIGKILL)
        state["killed"] = pid

    original = engine.Engine._write

    def write(self, work):
        original(self, work)
        if mode == "kill-driver" and self.progress.written == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "kill-actor" and self.progress.written == count:
            state["pids_after"] = self.executor.pids("generator")

    engine.Engine._write = write
    request = Request(
        config,
        {"references": refs, "count": count, "output": out, "executor": executor},
        overrides,
    )
    run = engine.Engine(request, plugins=plugins)
    if mode == "kill-actor":
        threading.Thread(target=kill_stalled_actor, args=(run,), daemon=True).start()
    summary = run.run()
    print(json.dumps({"written": summary.written, "failed": summary.failed, **state}))
    """
)


def smoke_config(smoke_dir, tmp_path):
    """The smoke generator and captions, tiny and without hires; a static bank."""
    path = tmp_path / "ray-smoke.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [extractor]
            use = "static"
            [extractor.values]
            garment = ["midi dress", "t-shirt and jeans", "long coat"]
            color = ["red", "navy", "white"]

            [generator]
            use = "diffusers"
            model = "{(smoke_dir / "sd15").as_posix()}"
            steps = 2
            cfg_scale = 4.0
            width = 64
            height = 96
            clip_skip = 2
            device = "cpu"
            dtype = "float32"
            threads = 2
            [generator.hires]
            enabled = false

            [annotators.captions]
            use = "blip2_captions"
            model = "{(smoke_dir / "blip2").as_posix()}"
            mode = "observe"
            max_new_tokens = 4
            device = "cpu"

            [ray.actors.annotators]
            captions = 1
            """
        )
    )
    return path


def namespace_or_skip() -> list[str]:
    """The command prefix that runs a shell in a fresh network namespace."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("Ray tests need unshare and ip (util-linux, iproute2)")
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(
            "Ray tests need a fresh network namespace (root, or user namespaces): "
            + probe.stderr.decode(errors="replace").strip()
        )
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def drive(tmp_path, config, refs, out, executor="ray", mode="plain", *overrides):
    pytest.importorskip("ray")
    pytest.importorskip("diffusers")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    command = [sys.executable, str(script), str(config), str(refs), str(out)]
    command += [str(COUNT), executor, mode, *overrides]
    prefix = namespace_or_skip() if executor == "ray" else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        prefix + command, capture_output=True, text=True, timeout=900, env=env
    )


def result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def records(out) -> list[dict]:
    lines = (out / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def ids_and_hashes(out) -> dict[str, str]:
    return {
        r["item_id"]: hashlib.sha256((out / r["file_name"]).read_bytes()).hexdigest()
        for r in records(out)
    }


def check_folder(out) -> None:
    """Exactly COUNT records with unique ids, each image present, no stray files."""
    rows = records(out)
    ids = [r["item_id"] for r in rows]
    assert len(rows) == COUNT
    assert len(set(ids)) == COUNT
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{i}.png" for i in ids
    )
    assert (out / "failures.jsonl").read_text() == ""


# --- placement and settings, without starting Ray -----------------------------------


def resolved(tmp_path, *overrides):
    config = tmp_path / "fake.toml"
    config.write_text('[extractor]\nuse = "fake"\n[generator]\nuse = "fake"\n')
    return resolve(Request(str(config), {}, list(overrides)), fake_plugins())


class FakeEngine:
    def __init__(self, resolved):
        self.resolved = resolved
        self.settings = resolved.settings


def test_executor_and_ray_settings_do_not_change_the_run(tmp_path):
    plain = resolved(tmp_path).fingerprint(["abc"])
    on_ray = resolved(
        tmp_path,
        "executor=ray",
        "address=ray://127.0.0.1:10001",
        "ray.pool=4",
        "ray.actors.generator=3",
    )
    assert on_ray.settings.executor == "ray"
    assert on_ray.fingerprint(["abc"]) == plain
    assert on_ray.sources["ray.pool"] == "--set"


def test_components_with_a_model_go_to_actors_unless_told_otherwise(tmp_path):
    ray = RayExecutor(FakeEngine(resolved(tmp_path, "executor=ray")))
    generator = ray.engine.resolved.one("generator")
    filters = ray.engine.resolved.components["filter"]
    captions = ray.engine.resolved.components["annotator"][0]
    # the fake generator and the image checks hold no model (no device option):
    # they stay in the driver; the pack's BLIP-2 captions get the default pool
    assert ray.pool_size(generator) == 0
    assert all(ray.pool_size(s) == 0 for s in filters)
    assert ray.parallel("generate") == 1
    assert captions.key == "captions" and ray.pool_size(captions) == 2
    assert ray.parallel("annotate") == 2

    ray = RayExecutor(
        FakeEngine(
            resolved(
                tmp_path,
                "executor=ray",
                "ray.actors.generator=3",
                "ray.actors.filters.image_checks=2",
                "ray.actors.annotators.captions=0",
            )
        )
    )
    assert ray.pool_size(ray.engine.resolved.one("generator")) == 3
    assert ray.parallel("generate") == 3
    assert ray.parallel("filter") == 2
    assert ray.parallel("annotate") == 1


def test_cuda_components_ask_for_gpus_and_pinned_threads_for_cpus(tmp_path):
    def resources(*overrides, cluster_gpus=0):
        engine = FakeEngine(
            resolved(tmp_path, "generator.use=diffusers", "ray.gpus=0.5", *overrides)
        )
        return RayExecutor(engine)._resources(
            engine.resolved.one("generator"), cluster_gpus
        )

    assert resources("generator.device=cuda") == (1.0, 0.5)
    assert resources("generator.device=auto", cluster_gpus=8) == (1.0, 0.5)
    assert resources("generator.device=auto") == (1.0, 0)
    assert resources("generator.device=cpu", "generator.threads=4") == (4, 0)


def test_a_bad_executor_is_refused_with_its_value(tmp_path):
    with pytest.raises(ConfigError, match="executor.*'dask'"):
        resolved(tmp_path, "executor=dask")


# --- runs on Ray ---------------------------------------------------------------------


def test_ray_gives_the_records_and_images_of_the_local_executor(
    tmp_path, few_refs, smoke_dir
):
    config = smoke_config(smoke_dir, tmp_path)
    local = tmp_path / "local"
    assert result(drive(tmp_path, config, few_refs, local, "local"))["written"] == 20
    on_ray = tmp_path / "ray"
    assert result(drive(tmp_path, config, few_refs, on_ray, "ray"))["written"] == 20

    assert ids_and_hashes(on_ray) == ids_and_hashes(local)
    check_folder(on_ray)
    run_json = json.loads((on_ray / "run.json").read_text())
    assert run_json["components"]["generator:generator"]["ray_actors"] == 2
    assert run_json["components"]["annotator:captions"]["ray_actors"] == 1
    assert run_json["settings"]["executor"]["value"] == "ray"


def test_an_actor_killed_mid_batch_loses_and_doubles_nothing(
    tmp_path, few_refs, smoke_dir
):
    config = smoke_config(smoke_dir, tmp_path)
    out = tmp_path / "out"
    done = result(
        drive(
            tmp_path,
            config,
            few_refs,
            out,
            "ray",
            "kill-actor",
            "generator.use=stall_once",
        )
    )
    assert done["written"] == COUNT and done["failed"] == 0
    # the stalled actor was killed, came back under a new pid and redid its batch
    assert done["killed"] not in done["pids_after"]
    assert len(done["pids_after"]) == 2
    check_folder(out)
    assert 5 in {r["index"] for r in records(out)}


def test_a_ray_run_killed_in_the_middle_resumes(tmp_path, few_refs, smoke_dir):
    config = smoke_config(smoke_dir, tmp_path)
    out = tmp_path / "out"
    killed = drive(tmp_path, config, few_refs, out, "ray", "kill-driver")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert 8 <= len(records(out)) < COUNT

    # resumed on Ray; a run started on one executor continues on the other too
    assert result(drive(tmp_path, config, few_refs, out, "ray"))["written"] == COUNT
    check_folder(out)
    assert not os.path.exists(ray_temp_dir(out)), "the killed run's Ray files"
    again = result(drive(tmp_path, config, few_refs, out, "local"))
    assert again["written"] == COUNT
    check_folder(out)
