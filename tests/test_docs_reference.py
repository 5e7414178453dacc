"""The generated references in docs/ match the code, and every hook is documented and tested."""

import re
from pathlib import Path

import pytest

from chatroom import docgen

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
TESTS = Path(__file__).parent
REGENERATE = "run `python -m chatroom.docgen` and commit the result"


@pytest.mark.parametrize("name", sorted(docgen.RENDERERS))
def test_generated_reference_is_up_to_date(name):
    path = DOCS / name
    assert path.is_file(), f"docs/{name} is missing: {REGENERATE}"
    rendered = docgen.RENDERERS[name]()
    assert path.read_text(encoding="utf-8") == rendered, (
        f"docs/{name} no longer matches the code it is generated from: {REGENERATE}"
    )


def test_config_reference_lists_only_built_in_components():
    plugins = docgen.builtin_plugins()
    assert {info.distribution for info in plugins.infos.values()} == {"chatroom"}
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    for stage, components in plugins.components.items():
        for name, cls in components.items():
            assert f"### `{name}`" in text, f"{stage} {name} is not in docs/config.md"
            for option in cls.Options.model_fields:
                assert f"`{option}" in text


def hook_names():
    return [name for name, _ in docgen.hook_specs()]


def test_the_hook_specs_are_found():
    assert {"register_filters", "run_started", "record_written"} <= set(hook_names())


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_reference_entry_and_a_test(hook):
    reference = (DOCS / "hooks.md").read_text(encoding="utf-8")
    assert f"### `{hook}`" in reference, f"docs/hooks.md has no entry for {hook}"

    pattern = re.compile(rf"\b{hook}\b")
    tests = [
        path
        for path in sorted(TESTS.rglob("test_*.py"))
        if path.name != Path(__file__).name
    ]
    assert any(pattern.search(path.read_text(encoding="utf-8")) for path in tests), (
        f"no test under tests/ mentions the hook {hook}; add one (see test_hooks.py)"
    )
