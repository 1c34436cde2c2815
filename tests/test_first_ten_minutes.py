"""What a newcomer meets in the first ten minutes (issue 16): the README's commands, start-up, help and answers."""

import re
import threading
from pathlib import Path

import requests
from conftest import serving

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start() -> str:
    return README[README.index("## Quick start") : README.index("\n## ", README.index("## Quick start") + 1)]


def test_ci_runs_the_readmes_test_command_word_for_word():
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start(), re.S)
    assert len(commands) == 2  # start the server; run the tests
    test_command = commands[1]
    assert test_command.endswith("pip install -r requirements-dev.txt && python -m pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_dev_requirements_hold_the_runtime_ones_and_every_test_tool():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    names = {re.split(r"[<>=\s]", line)[0] for line in lines if line}
    assert {"-r", "pytest", "ruff", "hypothesis"} <= names
    assert "-r requirements.txt" in lines


def test_the_choice_of_pytorch_build_comes_before_the_first_command():
    section = quick_start()
    first_command = section.index("```bash")
    for build in ("CPU-only", "CUDA", "Apple", "https://download.pytorch.org/whl/cpu"):
        assert -1 < section.find(build) < first_command, build


def test_a_stopped_test_server_leaves_no_thread_that_could_write_to_a_reused_descriptor(engine):
    """The cause of a stray 'x' on a later subprocess's stdout: a waitress thread outliving its server."""
    before = set(threading.enumerate())
    with serving(engine) as url:
        assert requests.get(f"{url}/samplers", timeout=60).status_code == 200
    assert [thread.name for thread in set(threading.enumerate()) - before] == []
