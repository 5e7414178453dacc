"""One formatter and one linter, as CI runs them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PATHS = ["core", "plugins", "domains", "tests", "benchmarks"]


def ruff(*args):
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which(
        "ruff"
    )
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return subprocess.run(
        [exe, *args, *PATHS], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_check_passes():
    result = ruff("check")
    assert result.returncode == 0, result.stdout[-3000:]


def test_ruff_format_is_clean():
    result = ruff("format", "--check")
    assert result.returncode == 0, result.stdout[-3000:]
