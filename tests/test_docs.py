"""The README's commands and the docs stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_commands():
    return re.findall(
        r"```bash\n(python3 -m venv .*?)\n```", (ROOT / "README.md").read_text()
    )


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert "pytest" in tests and "chatroom run" in main_job


def test_the_main_job_command_uses_the_shared_photos():
    main_job, _ = readme_commands()
    assert "--references ../shared/data/reference/fashion" in main_job
    assert "--domain fashion" in main_job


def _extras_closure(names: set[str]) -> set[str]:
    """The extras named, and every extra they pull in through `chatroom[...]`."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in extras[name]:
            found = re.fullmatch(r"chatroom\[([^\]]+)\]", requirement)
            if found:
                todo.extend(found.group(1).split(","))
    return seen


def test_the_main_job_installs_what_the_smoke_config_runs(smoke_dir):
    from chatroom.manager import Plugins
    from chatroom.resolve import Request, resolve

    main_job, _ = readme_commands()
    installed = _extras_closure(
        set(re.search(r"-e '\.\[([^\]]+)\]'", main_job).group(1).split(","))
    )
    request = Request(
        config_path=str(smoke_dir / "smoke.toml"),
        flags={"domain": "fashion", "references": str(ROOT)},
    )
    resolved = resolve(request, Plugins())
    needed = {
        re.fullmatch(r"chatroom\[(\w+)\]", extra).group(1): spec.cls.name
        for specs in resolved.components.values()
        for spec in specs
        for _module, extra in spec.cls.requires
    }
    missing = {extra: who for extra, who in needed.items() if extra not in installed}
    assert not missing, f"the README's main job does not install {missing}"


def test_the_readme_config_for_the_papers_models_turns_them_all_on(tmp_path):
    from chatroom.manager import Plugins
    from chatroom.resolve import Request, resolve

    readme = (ROOT / "README.md").read_text()
    config = tmp_path / "my.toml"
    config.write_text(re.search(r"```toml\n(# my\.toml.*?)```", readme, re.S)[1])
    request = Request(
        config_path=str(config), flags={"domain": "fashion", "references": str(ROOT)}
    )
    components = resolve(request, Plugins()).components
    used = {spec.cls.name for specs in components.values() for spec in specs}
    paper = {"blip2", "clip_nsfw", "openpose", "openpose_keypoints", "graphonomy"}
    assert paper | {"quality", "blip2_captions"} <= used
