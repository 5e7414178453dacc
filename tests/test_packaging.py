"""The wheel: what it holds, and that it works when installed away from the checkout.

The wheel is built from a copy of the checkout, so that the build leaves no build/ or
egg-info behind in it. It is installed into a new virtual environment that finds the
dependencies (click, rich, pydantic, ...) through a ``.pth`` line pointing at this
interpreter's site-packages, so nothing is downloaded.
"""

import configparser
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOMAINS = ("fashion", "furniture", "architecture")
BUILT_INS = {
    "template": "chatroom.plugins.template_prompter",
    "llm": "chatroom.plugins.llm_prompter",
    "static": "chatroom.plugins.static_extractor",
    "diffusers": "chatroom.plugins.diffusers_generator",
    "webui": "chatroom.plugins.webui_generator",
    "blip2": "chatroom.plugins.blip2",
    "image_checks": "chatroom.plugins.image_checks",
    "pose": "chatroom.plugins.pose",
    "nudenet": "chatroom.plugins.nudenet_filter",
    "person_mask": "chatroom.plugins.person_mask",
    "openpose": "chatroom.plugins.openpose",
    "graphonomy": "chatroom.plugins.graphonomy",
    "clip_nsfw": "chatroom.plugins.clip_nsfw",
    "quality": "chatroom.plugins.quality",
    "near_duplicates": "chatroom.plugins.near_duplicates",
    "mask_check": "chatroom.plugins.mask_check",
    "object_checks": "chatroom.plugins.object_checks",
    "scene_checks": "chatroom.plugins.scene_checks",
    "control_maps": "chatroom.plugins.control_maps",
    "vision": "chatroom.plugins.vision_extractor",
    **{domain: f"chatroom.domains.{domain}" for domain in DOMAINS},
}
PRINT_PACKS = "from chatroom.manager import Plugins; print(*Plugins().domains.values())"
LEFT_BEHIND = (
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".git",
    ".ruff_cache",
    ".pytest_cache",
    ".venv",
    "venv",
    "out*",
    "smoke*",
)


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "chatroom"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
    dist = tmp_path_factory.mktemp("dist")
    # -x: setuptools>=70.1 builds wheels itself; the `wheel` package may be absent
    run(
        sys.executable,
        "-m",
        "build",
        "--wheel",
        "--no-isolation",
        "-x",
        "-o",
        dist,
        cwd=source,
    )
    [built] = dist.glob("chatroom-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_holds_the_package_plugins_and_domain_packs(names):
    for module in ("__init__", "cli", "hookspecs", "manager", "components", "testing"):
        assert f"chatroom/{module}.py" in names
    for module in ("__init__", "build", "render", "stats", "embed", "quality"):
        assert f"chatroom/report/{module}.py" in names
    for plugin in (
        "image_checks",
        "template_prompter",
        "static_extractor",
        "diffusers_generator",
        "blip2",
    ):
        assert f"chatroom/plugins/{plugin}.py" in names
    for domain in DOMAINS:
        pack = f"chatroom/domains/{domain}"
        for file in ("__init__.py", "pack.toml", "fewshot.jsonl"):
            assert f"{pack}/{file}" in names
        wildcards = [n for n in names if n.startswith(f"{pack}/wildcards/")]
        assert wildcards, f"{pack} has no wildcard files"
        assert all(n.endswith(".txt") for n in wildcards)


def test_wheel_leaves_tests_and_sources_out(names):
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"chatroom", "chatroom-0.1.0.dist-info"}
    assert not [n for n in names if "/tests/" in n or n.endswith("conftest.py")]
    assert not [n for n in names if n.endswith((".pyc", ".egg-info"))]


def test_wheel_entry_points(wheel):
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read("chatroom-0.1.0.dist-info/entry_points.txt").decode()
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str
    entry_points.read_string(text)

    assert dict(entry_points["chatroom"]) == BUILT_INS
    assert dict(entry_points["console_scripts"]) == {"chatroom": "chatroom.cli:main"}
    assert dict(entry_points["pytest11"]) == {"chatroom": "chatroom.testing"}


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
        ).stdout.strip()
    )
    # the dependencies come from this interpreter's site-packages, appended after the
    # venv's own; .pth files there (such as an editable install's) are not processed
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--disable-pip-version-check",
        "--quiet",
        wheel,
    )

    located = run(
        python, "-c", "import chatroom; print(chatroom.__file__)", cwd=tmp_path
    )
    assert Path(located.stdout.strip()) == site / "chatroom" / "__init__.py"
    packs = run(python, "-c", PRINT_PACKS, cwd=tmp_path).stdout.split()
    assert sorted(packs) == sorted(
        str(site / "chatroom" / "domains" / d) for d in DOMAINS
    )

    console_script = venv / "bin" / "chatroom"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "COLUMNS": "200"}
    assert "Commands:" in run(console_script, "--help", cwd=tmp_path, env=env).stdout
    listed = run(console_script, "domains", cwd=tmp_path, env=env).stdout
    domains = {line.split()[0] for line in listed.splitlines()[1:] if line.strip()}
    assert set(DOMAINS) <= domains
