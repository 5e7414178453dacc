"""`chatroom --help` and the listing commands start without the heavy libraries.

Each command runs in a fresh interpreter, in process through click, and the script
reports which heavy modules ended up in ``sys.modules``.
"""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "diffusers", "transformers", "accelerate")
SCRIPT = """
import json, sys
from chatroom.cli import main

try:
    main(sys.argv[1:], prog_name="chatroom", standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
print(json.dumps(heavy), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize(
    "args", [["--help"], ["plugins"], ["domains"], ["run", "--help"]]
)
def test_command_does_not_import_heavy_libraries(args, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHATROOM_PLUGINS", "CHATROOM_STRICT_PLUGINS")
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the command printed nothing"
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []


def test_doctor_prints_install_hints_as_text(monkeypatch, capsys):
    import importlib.util

    from chatroom.views import show_doctor

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "mediapipe" else real(name, *args),
    )
    monkeypatch.setenv("COLUMNS", "300")
    assert not show_doctor(None, "architecture", [], profile="offline")
    assert "MISSING: pip install 'chatroom[offline]'" in capsys.readouterr().out
