"""Third-party plugins installed with pip: listed, used by a run, and failing cleanly.

The packages under ``tests/plugins`` are real distributions with entry points in the
``chatroom`` group. They are installed once for this module into a folder of their own
that is put on ``sys.path`` (and ``PYTHONPATH`` for the CLI), rather than into the
shared virtual environment: a broken plugin there would show up in every other test
session running at the same time, and stay if this one were killed before teardown.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from chatroom.errors import PluginError
from chatroom.manager import Plugins

PACKAGES = Path(__file__).parent / "plugins"
DISTRIBUTIONS = {
    "chatroom-example-filter": "chatroom_example_filter",
    "chatroom-broken-plugin": "chatroom_broken_plugin",
    "chatroom-bad-hook": "chatroom_bad_hook",
}
PLUGIN_VARIABLES = ("CHATROOM_PLUGINS", "CHATROOM_STRICT_PLUGINS", "CHATROOM_LOG")


def our_entry_points() -> set[str]:
    modules = set(DISTRIBUTIONS.values())
    return {
        ep.name for ep in metadata.entry_points(group="chatroom") if ep.value in modules
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The three test plugins, pip-installed into a folder on ``sys.path``."""
    sources = tmp_path_factory.mktemp("plugin-sources")
    target = tmp_path_factory.mktemp("site-packages")
    folders = []
    for name in DISTRIBUTIONS:
        # build from a copy so that no build/ or egg-info lands in the source tree
        folder = sources / name
        shutil.copytree(
            PACKAGES / name,
            folder,
            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
        )
        folders.append(str(folder))
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            *folders,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if pip.returncode != 0:
        pytest.fail(f"pip could not install the test plugins:\n{pip.stderr}")
    assert not our_entry_points(), "test plugins are already installed elsewhere"

    sys.path.append(str(target))
    importlib.invalidate_caches()
    yield target

    sys.path.remove(str(target))
    for module in DISTRIBUTIONS.values():
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    assert not our_entry_points(), "the test plugins outlived their module"


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    for name in PLUGIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def chatroom(
    site: Path, cwd: Path, *args: str, **env: str
) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter that sees the test plugins."""
    environ = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARIABLES}
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site), environ.get("PYTHONPATH", "")) if p
    )
    environ["COLUMNS"] = "400"  # rich wraps at 80 columns when piped
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "chatroom.cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd,
        timeout=60,
    )


def table(stdout: str) -> dict[str, list[str]]:
    """`chatroom plugins` rows by plugin name: [version, stages, components]."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        if not line.strip() or line.startswith("failed to load:"):
            continue
        name, version, rest = line.split(maxsplit=2)
        stages, _, components = rest.partition("  ")
        rows[name] = [version, stages.strip(), components.strip()]
    return rows


def failures(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("failed to load:")]


# --- chatroom plugins ------------------------------------------------------------


def test_built_ins_cover_all_five_stages(site, tmp_path):
    result = chatroom(site, tmp_path, "plugins")

    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    expected = {
        "template": ("prompter", "template"),
        "static": ("extractor", "static"),
        "diffusers": ("generator", "diffusers"),
        "image_checks": ("filter", "image_checks"),
        "blip2": ("annotator", "blip2_captions"),
    }
    for plugin, (stage, component) in expected.items():
        assert plugin in rows, f"built-in plugin {plugin} is not listed"
        assert stage in rows[plugin][1].split(", ")
        assert component in rows[plugin][2].split(", ")
    for domain in ("fashion", "furniture", "architecture"):
        assert rows[domain][1:] == ["domain", f"{domain} (domain)"]


def test_third_party_filter_is_listed_with_its_version(site, tmp_path):
    result = chatroom(site, tmp_path, "plugins")

    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["example_filter"] == [
        "0.3.1",
        "filter",
        "max_brightness",
    ]


def test_broken_plugin_is_reported_and_the_others_still_load(site, tmp_path):
    result = chatroom(site, tmp_path, "plugins")

    assert result.returncode == 0, result.stderr
    assert (
        "failed to load: broken (chatroom_broken_plugin): RuntimeError: broken on purpose"
        in failures(result.stdout)
    )
    rows = table(result.stdout)
    assert "broken" not in rows
    assert {"example_filter", "image_checks", "template", "fashion"} <= set(rows)
    assert "Traceback" not in result.stdout + result.stderr


def test_plugin_with_an_unknown_hook_is_rejected(site, tmp_path):
    result = chatroom(site, tmp_path, "plugins")

    assert result.returncode == 0, result.stderr
    [line] = [
        f for f in failures(result.stdout) if f.startswith("failed to load: bad_hook")
    ]
    assert "(chatroom_bad_hook)" in line
    assert "unknown hook 'register_widgets'" in line
    assert "bad_hook" not in table(result.stdout)


def test_chatroom_plugins_variable_limits_what_loads(site, tmp_path):
    result = chatroom(
        site, tmp_path, "plugins", CHATROOM_PLUGINS="example_filter, template"
    )

    assert result.returncode == 0, result.stderr
    assert set(table(result.stdout)) == {"example_filter", "template"}
    assert failures(result.stdout) == []


@pytest.mark.parametrize(
    ("plugin", "module", "error"),
    [
        ("broken", "chatroom_broken_plugin", "RuntimeError: broken on purpose"),
        ("bad_hook", "chatroom_bad_hook", "unknown hook 'register_widgets'"),
    ],
)
def test_strict_mode_makes_a_failed_load_fatal(site, tmp_path, plugin, module, error):
    result = chatroom(
        site,
        tmp_path,
        "plugins",
        CHATROOM_STRICT_PLUGINS="1",
        CHATROOM_PLUGINS=f"template,{plugin},example_filter",
    )

    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: plugin '{plugin}' ({module}) failed to load: ")
    assert error in line


def test_strict_mode_without_a_limit_names_a_failing_plugin(site, tmp_path):
    result = chatroom(site, tmp_path, "plugins", CHATROOM_STRICT_PLUGINS="1")

    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(("error: plugin 'bad_hook'", "error: plugin 'broken'"))


# --- the manager in process ------------------------------------------------------


def test_manager_records_failures_and_components(site):
    plugins = Plugins()

    assert {(f.name, f.module) for f in plugins.failures} == {
        ("broken", "chatroom_broken_plugin"),
        ("bad_hook", "chatroom_bad_hook"),
    }
    assert plugins.component("filter", "max_brightness").cost == 0.05
    assert plugins.owner("filter", "max_brightness") == "example_filter"
    info = plugins.infos["example_filter"]
    assert (info.version, info.distribution) == ("0.3.1", "chatroom-example-filter")
    assert not plugins.pm.has_plugin("bad_hook"), "a rejected plugin stays unregistered"


def test_manager_strict_and_only_arguments(site):
    with pytest.raises(PluginError, match=r"plugin 'broken' .*broken on purpose"):
        Plugins(strict=True, only=["broken"])

    plugins = Plugins(strict=True, only=["example_filter"])
    assert list(plugins.infos) == ["example_filter"]
    assert plugins.failures == []


def test_filter_options_are_validated(site):
    from chatroom.components import validate_options

    cls = Plugins(only=["example_filter"]).component("filter", "max_brightness")
    assert validate_options(cls, "filters.bright", {}).max_mean == 200.0
    with pytest.raises(
        Exception, match=r"filters\.bright \(max_brightness\).*max_meen"
    ):
        validate_options(cls, "filters.bright", {"max_meen": 3})


# --- a run that names the filter -------------------------------------------------


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_rejects_with_the_installed_filter(site, chatroom_run, few_refs):
    summary, out = chatroom_run(
        few_refs,
        count=2,
        max_candidates=4,
        overrides=[
            'filters.bright.use="max_brightness"',
            "filters.bright.max_mean=1.0",
        ],
    )

    assert summary.status == "budget exhausted"
    assert summary.written == 0
    rejected = rows(out / "rejected.jsonl")
    assert len(rejected) == 4
    for row in rejected:
        assert (row["stage"], row["component"]) == ("filter", "bright")
        assert row["reason"].startswith("too bright: mean pixel value ")
        assert row["reason"].endswith(" is above 1.00")
        assert row["scores"]["mean"] > 1.0
        assert f"{row['scores']['mean']:.2f}" in row["reason"]
    assert "bright: too bright" in summary.message


def test_run_records_the_installed_filter_verdicts(site, chatroom_run, few_refs):
    summary, out = chatroom_run(
        few_refs,
        count=3,
        overrides=['filters.bright.use="max_brightness"'],
    )

    assert summary.status == "complete"
    records = rows(out / "metadata.jsonl")
    assert len(records) == 3
    for record in records:
        verdicts = {v["filter"]: v for v in record["verdicts"]}
        assert {"image_checks", "bright"} <= set(verdicts)
        mine = verdicts["bright"]
        assert mine["passed"] is True
        assert 0 < mine["scores"]["mean"] <= 200.0
    run = json.loads((out / "run.json").read_text())
    bright = run["components"]["filter:bright"]
    assert (bright["component"], bright["plugin"], bright["plugin_version"]) == (
        "max_brightness",
        "example_filter",
        "0.3.1",
    )
    assert {f["name"] for f in run["plugin_failures"]} == {"broken", "bad_hook"}
