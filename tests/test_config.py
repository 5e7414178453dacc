"""Config files, overrides, settings sources, secrets and pack folders of one's own."""

import json
import re
import shutil

import pytest
from pydantic import Field

from chatroom.components import Filter, Options
from chatroom.config import parse_override, redact
from chatroom.errors import ConfigError
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict


def test_overrides_are_read_as_toml_values():
    assert parse_override("generator.cfg_scale=4") == {"generator": {"cfg_scale": 4}}
    assert parse_override("generator.hires.enabled=false") == {
        "generator": {"hires": {"enabled": False}}
    }
    assert parse_override("domain=fashion") == {"domain": "fashion"}
    assert parse_override('prompter.template="a, b"') == {
        "prompter": {"template": "a, b"}
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("generator.steps")
    with pytest.raises(ConfigError, match="malformed"):
        parse_override("generator..steps=3")


def test_yaml_config_and_cli_layers(chatroom_run, few_refs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "extractor: {use: fake}\n"
        "generator: {use: fake, width: 48, height: 64}\n"
        "annotators: {captions: {enabled: false}}\n"
        "seed: 11\n"
    )
    from chatroom.engine import Engine
    from chatroom.resolve import Request

    out = tmp_path / "out"
    request = Request(
        str(config),
        {"references": str(few_refs), "count": 1, "output": str(out)},
        ["generator.height=72"],
    )
    from chatroom.testing import fake_plugins

    Engine(request, plugins=fake_plugins()).run()
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["seed"] == {"value": 11, "source": f"config:{config}"}
    assert settings["generator.width"]["value"] == 48
    assert settings["generator.height"] == {"value": 72, "source": "--set"}
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["seed"] == 11 and record["settings"]["height"] == 72


def test_unparsable_config_names_the_file(chatroom_run, few_refs, tmp_path):
    from chatroom.config import load_file

    bad = tmp_path / "bad.toml"
    bad.write_text("[generator\nsteps = 3")
    with pytest.raises(ConfigError, match=r"bad\.toml: cannot parse"):
        load_file(bad)


class KeyedOptions(Options):
    api_key: str = Field("", description="A secret, to prove it never reaches a file.")
    service_token: str = ""


class KeyedFilter(Filter):
    name = "keyed"
    Options = KeyedOptions

    def check(self, candidates):
        return [Verdict(passed=True) for _ in candidates]


class KeyedPlugin:
    @hookimpl
    def register_filters(self, register):
        register(KeyedFilter)


def test_secrets_never_reach_run_json_or_records(
    chatroom_plugins, chatroom_run, few_refs, monkeypatch
):
    chatroom_plugins.register(KeyedPlugin(), name="keyed")
    monkeypatch.setattr(
        "sys.argv", ["chatroom", "run", "--set", 'filters.k.api_key="sk-secret-1"']
    )
    _, out = chatroom_run(
        few_refs,
        count=1,
        overrides=[
            'filters.k.use="keyed"',
            'filters.k.api_key="sk-secret-1"',
            'filters.k.service_token="tok-secret-2"',
        ],
    )
    for path in out.iterdir():
        if path.is_file():
            text = path.read_bytes()
            assert b"sk-secret-1" not in text and b"tok-secret-2" not in text, path
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["filters.k.api_key"]["value"] == "<redacted>"
    assert "filters.k.api_key=<redacted>" in info["command"]


def test_redact_leaves_other_values():
    flat = {"generator.steps": 30, "prompter.api_key": "sk", "x.password": ""}
    assert redact(flat) == {
        "generator.steps": 30,
        "prompter.api_key": "<redacted>",
        "x.password": "",
    }


def test_a_pack_folder_of_ones_own(chatroom_run, few_refs, tmp_path):
    from chatroom.domains import fashion

    pack = tmp_path / "streetwear"
    shutil.copytree(fashion.PACK, pack, ignore=shutil.ignore_patterns("*.py", "__py*"))
    text = (pack / "pack.toml").read_text()
    text = text.replace('name = "fashion"', 'name = "streetwear"', 1)
    text = text.replace("best quality,", "streetwear lookbook, best quality,", 1)
    (pack / "pack.toml").write_text(text)

    _, out = chatroom_run(few_refs, count=1, domain=str(pack))

    info = json.loads((out / "run.json").read_text())
    assert info["domain"]["name"] == "streetwear"
    prompt = json.loads((out / "prompts.jsonl").read_text().splitlines()[0])["prompt"]
    assert prompt.startswith("streetwear lookbook")


def test_a_broken_pack_names_its_file(chatroom_run, few_refs, tmp_path):
    pack = tmp_path / "broken"
    pack.mkdir()
    (pack / "pack.toml").write_text('name = "broken"\n[questions]\ncaptions = []\n')
    with pytest.raises(ConfigError, match=r"broken/pack\.toml"):
        chatroom_run(few_refs, count=1, domain=str(pack))


def _filters(chatroom_plugins, few_refs, *overrides, domain="fashion"):
    from chatroom.resolve import Request, resolve

    request = Request(
        flags={"domain": domain, "references": str(few_refs)},
        overrides=list(overrides),
    )
    return [s.key for s in resolve(request, chatroom_plugins).components["filter"]]


def test_domains_keeps_a_component_to_the_packs_it_names(chatroom_plugins, few_refs):
    scoped = 'filters.image_checks.domains=["furniture", "architecture"]'
    assert "image_checks" not in _filters(chatroom_plugins, few_refs, scoped)
    assert "image_checks" in _filters(
        chatroom_plugins, few_refs, scoped, domain="furniture"
    )
    both = 'filters.image_checks.domains=["fashion"]'
    assert "image_checks" in _filters(chatroom_plugins, few_refs, both)


@pytest.mark.parametrize(
    "value, message",
    [
        ('["furnitur"]', "unknown domain 'furnitur' (did you mean 'furniture'?)"),
        ("[]", "filters.image_checks.domains is empty"),
        ('"furniture"', "expected a list of domain names"),
    ],
)
def test_a_bad_domains_value_is_one_clear_error(
    chatroom_plugins, few_refs, value, message
):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _filters(chatroom_plugins, few_refs, f"filters.image_checks.domains={value}")


class NeedsALibrary(Filter):
    name = "needs_a_library"
    description = "a filter whose library is not installed"
    requires = (("chatroom_no_such_library", "chatroom[offline]"),)

    def check(self, candidates):
        return [Verdict(passed=True) for _ in candidates]


class OffersNeedsALibrary:
    @hookimpl
    def register_filters(self, register):
        register(NeedsALibrary)


def test_a_missing_library_stops_the_run_before_any_work(
    chatroom_run, chatroom_plugins, few_refs, tmp_path
):
    from chatroom.errors import MissingDependency

    chatroom_plugins.register(OffersNeedsALibrary(), name="needs")
    out = tmp_path / "never"
    with pytest.raises(MissingDependency) as caught:
        chatroom_run(
            few_refs, output=out, overrides=['filters.x.use="needs_a_library"']
        )
    assert str(caught.value) == (
        "needs_a_library needs the 'chatroom_no_such_library' library: "
        "pip install 'chatroom[offline]'"
    )
    assert not out.exists()


def test_a_bad_value_names_the_file_it_came_from(few_refs, tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text(
        '[extractor]\nuse = "fake"\n[generator]\nuse = "fake"\nwidth = "wide"\n'
    )
    from chatroom.resolve import Request, resolve
    from chatroom.testing import fake_plugins

    request = Request(config_path=str(config), flags={"references": str(few_refs)})
    with pytest.raises(ConfigError) as caught:
        resolve(request, fake_plugins())
    assert str(caught.value).endswith(f"(set in config:{config})")
    assert "option 'width' = 'wide'" in str(caught.value)


def test_a_stage_option_set_at_the_top_points_to_its_section(few_refs):
    from chatroom.resolve import Request, resolve
    from chatroom.testing import fake_plugins

    request = Request(flags={"references": str(few_refs)}, overrides=["steps=3"])
    with pytest.raises(ConfigError, match=r"'steps' \(did you mean 'generator.steps'"):
        resolve(request, fake_plugins())


def test_a_pack_folder_that_does_not_exist_is_named(tmp_path):
    from chatroom.domain import resolve_domain

    with pytest.raises(ConfigError, match="domain pack folder .*/nope does not exist"):
        resolve_domain(str(tmp_path / "nope"), {"fashion": tmp_path})
