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
