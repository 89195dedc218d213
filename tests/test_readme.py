"""The README's two commands stay true: CI runs the test command verbatim; the main job is a real module."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ")[0]  # the commands come before the first section
    return re.findall(r"```bash\n(.*?)\n```", head, flags=re.S)


def test_readme_starts_with_the_two_commands():
    main_job, tests = readme_commands()
    assert main_job.startswith("pip install torch==2.14.1 triton==3.8.0")
    assert tests.startswith("pip install torch==2.14.1 triton==3.8.0")
    assert tests.endswith("python -m pytest")
    module = re.search(r"python -m ([\w.]+)", main_job.split("&&")[-1]).group(1)
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
