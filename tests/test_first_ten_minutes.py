"""What a newcomer meets in the first ten minutes (issue 16): the README's commands, start-up, help and answers."""

import gc
import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch
from conftest import FAST, free_port, read_log_until_listening, serving, wait_until
from PIL import Image

import engine.engine
import imagine
from engine.devices import pick_dtype
from engine.request import RANDOM_SEEDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start() -> str:
    return README[README.index("## Quick start") : README.index("\n## ", README.index("## Quick start") + 1)]


def quick_start_commands() -> list:
    return re.findall(r"```bash\n(.*?)\n```", quick_start(), re.S)


def test_ci_runs_the_readmes_test_command_word_for_word():
    [test_command] = [command for command in quick_start_commands() if command.endswith("python -m pytest")]
    assert "pip install -r requirements-dev.txt && pip install --no-deps -r requirements-no-deps.txt" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    assert not [line for line in ci if line.startswith("pip install") and "torch==" not in line]  # nothing else


def test_the_dev_requirements_hold_the_runtime_ones_and_every_test_tool():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    names = {re.split(r"[<>=\s]", line)[0] for line in lines if line}
    assert {"-r", "pytest", "ruff", "hypothesis"} <= names
    assert "-r requirements.txt" in lines


def test_the_quick_start_gives_linux_without_a_gpu_its_own_command_installing_the_cpu_only_build():
    """Copying the CUDA/Apple line there would download the multi-GB CUDA build instead."""
    section = quick_start()
    installs = [command for command in quick_start_commands() if command.endswith("pip install -r requirements.txt")]
    assert len(installs) == 2  # one per kind of machine; then one start, which the tests' line does not repeat
    assert [command for command in quick_start_commands() if "imagine.py" in command] == [
        "python imagine.py --model demo"
    ]
    cuda_or_apple, cpu_only = installs
    assert "--index-url" not in cuda_or_apple
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install -r requirements.txt" in (
        cpu_only
    )
    for build in ("CUDA", "Apple"):
        assert -1 < section.find(build) < section.index(cuda_or_apple), build
    assert -1 < section.find("without an NVIDIA GPU") < section.index(cpu_only)


def test_the_quick_start_says_to_activate_the_environment_in_a_second_terminal_before_the_examples():
    section = quick_start()
    assert "second terminal" in section
    assert ". .venv/bin/activate && set -o pipefail" in quick_start_commands()


def test_a_stopped_test_server_leaves_no_thread_that_could_write_to_a_reused_descriptor(engine):
    """The cause of a stray 'x' on a later subprocess's stdout: a waitress thread outliving its server."""
    before = set(threading.enumerate())
    with serving(engine) as url:
        assert requests.get(f"{url}/samplers", timeout=60).status_code == 200
    gc.collect()  # the app's job store goes, and with it its sweeper (which holds it weakly), within a second
    wait_until(lambda: not set(threading.enumerate()) - before, "the server's threads have ended", timeout=10)


# Runs a script as `python script args` would, then reports how it exited and which heavy libraries it had
# imported by then: a bound on --help's time that a busy machine cannot break.
AS_MAIN = """
import json, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    print(json.dumps([exit.code, sorted({"torch", "diffusers", "transformers"} & set(sys.modules))]))
"""


def run_as_main(script: str, *args: str) -> tuple:
    """(exit code, heavy modules imported, stdout before the report, stderr) of `python script args`."""
    result = subprocess.run(
        [sys.executable, "-c", AS_MAIN, str(ROOT / script), *args], capture_output=True, text=True, timeout=300
    )
    *output, report = result.stdout.splitlines()
    code, imported = json.loads(report)
    return code, imported, "\n".join(output), result.stderr


def option_helps(output: str) -> list:
    """Each option's help text from argparse's --help, on one line each."""
    return [" ".join(entry.split()) for entry in re.split(r"\n  (?=-)", output.split("options:\n", 1)[1])]


def test_server_help_comes_before_torch_is_imported_and_shows_every_default():
    code, imported, output, _ = run_as_main("imagine.py", "--help")
    assert (code, imported) == (0, [])
    for option in option_helps(output):
        assert "default" in option or option.startswith("-h, --help"), option
    assert "default 127.0.0.1" in output and "default 5000" in output


def test_a_mistyped_server_flag_is_refused_before_torch_is_imported():
    code, imported, _, errors = run_as_main("imagine.py", "--prot", "5001")
    assert (code, imported) == (2, [])
    assert "unrecognized arguments: --prot" in errors


def test_cli_help_comes_without_importing_torch_and_shows_defaults():
    code, imported, output, _ = run_as_main("imagine-cli.py", "--help")
    assert (code, imported) == (0, [])
    for option in option_helps(output):
        assert "default" in option or option.startswith(("--img", "--local", "--help")), option


def test_the_cli_without_one_of_its_dependencies_says_in_one_line_what_to_install(tmp_path):
    script = f"import runpy, sys; sys.modules['tqdm'] = None; runpy.run_path({str(ROOT / 'imagine-cli.py')!r})"
    result = subprocess.run([sys.executable, "-c", script, "a cat"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("imagine: ") and "no module 'tqdm'" in line
    assert f"pip install -r {ROOT / 'requirements.txt'}" in line and f"{ROOT / '.venv'}" in line  # see test_new_user


def test_a_mistyped_default_model_stops_the_start_with_one_line_naming_it_and_the_models_directory(tmp_path):
    command = [sys.executable, str(ROOT / "imagine.py"), "--model", "dremshaper_8", "--models-dir", str(tmp_path)]
    result = subprocess.run([*command, "-d", "cpu", "-f", "32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    loading, line = result.stderr.splitlines()  # the log's first line, then the error's one
    assert loading.endswith("INFO loading torch and diffusers...")
    assert line.startswith("imagine: the default model 'dremshaper_8' (--model, IMAGINE_MODEL) is neither in")
    assert str(tmp_path) in line and "--models-dir" in line


def test_a_default_model_that_exists_or_demo_passes_the_start_up_check(engine, models_dir, make_engine):
    imagine.check_default_model(engine)  # demo: built in memory, never a file
    tiny = make_engine(model="tiny", models_dir=models_dir)
    imagine.check_default_model(tiny)
    assert not tiny.models.loaded  # found, not loaded


def test_every_request_gets_an_access_line_and_a_refusal_says_why_without_body_or_key(make_engine, caplog):
    client = imagine.create_app(make_engine(model="demo", api_key="the-secret-key")).test_client()
    key = {"Authorization": "Bearer the-secret-key"}
    with caplog.at_level("INFO", logger="imagine"):
        client.post("/generate", json={"prompt": "my private prompt", "width": 100}, headers=key)
        client.post("/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer a-wrong-key"})
        client.get("/samplers", headers=key)
    lines = [record.getMessage() for record in caplog.records if '"' in record.getMessage()]
    assert lines == [
        '127.0.0.1 "POST /generate" 400 "width must be a multiple of 8, not 100"',
        '127.0.0.1 "POST /generate" 401 "this server needs an API key: send \'Authorization: Bearer <key>\', or HTTP '
        'Basic with the key as the password (any user name)"',
        '127.0.0.1 "GET /samplers" 200',
    ]
    assert [record.levelname for record in caplog.records if '"' in record.getMessage()][:2] == ["WARNING"] * 2
    assert "private" not in caplog.text and "the-secret-key" not in caplog.text and "wrong-key" not in caplog.text


def test_a_logged_refusal_stays_on_one_line_whatever_the_client_sent(client, caplog):
    with caplog.at_level("INFO", logger="imagine"):
        client.post("/generate", json={"prompt": "x", "model": "a\nfake log line"})
        client.get("/no%0Awhere")
    lines = [record.getMessage() for record in caplog.records]
    assert all("\n" not in line for line in lines)
    assert any('"POST /generate" 404 "model \'a\\\\nfake log line\' not found' in line for line in lines), lines
    assert any('"GET /no\\nwhere" 404' in line for line in lines), lines


def test_seed_minus_one_means_a_random_seed_as_in_automatic1111(client):
    fields = {"prompt": "x", "width": 64, "height": 64, "num_steps": 1, "seed": -1}
    seeds = [client.post("/generate", json=fields).get_json()["seed"] for _ in range(2)]
    assert all(0 <= seed < RANDOM_SEEDS for seed in seeds) and seeds[0] != seeds[1]
    for refused in (-2, -1.0):
        assert client.post("/generate", json={**fields, "seed": refused}).status_code == 400


def test_the_cli_tells_the_seed_it_drew_on_stderr_after_saving_and_minus_one_draws_one(live_server, tmp_path):
    command = [
        sys.executable,
        str(ROOT / "imagine-cli.py"),
        "a boat",
        "-w",
        "64",
        "-h",
        "64",
        "-n",
        "2",
        "--seed",
        "-1",
    ]
    result = subprocess.run(
        [*command, "--server", live_server], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    [path] = result.stdout.splitlines()  # stdout stays the path alone
    seed = int(re.fullmatch(r"seed (\d+)\n", result.stderr)[1])
    assert f"Seed: {seed}," in Image.open(tmp_path / path).info["parameters"]


def test_an_unknown_model_answers_404_saying_how_to_list_the_models_without_the_servers_path(client, models_dir):
    response = client.post("/generate", json={"prompt": "x", "model": "dremshaper_8"})
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error.startswith("model 'dremshaper_8' not found") and "(--models-dir, IMAGINE_MODELS_DIR)" in error
    assert "GET /models" in error
    assert str(models_dir) not in error


def test_the_servers_address_answers_json_naming_every_endpoint_and_the_readme(client):
    response = client.get("/")
    assert response.status_code == 200
    answer = response.get_json()
    assert "README.md" in answer["readme"]
    routes = {
        f"{method} {rule.rule}"
        for rule in client.application.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert set(answer["endpoints"]) == routes


def test_the_readmes_model_lines_put_a_download_where_the_server_finds_it_at_start(tmp_path):
    """The Models section's two lines, as written, for a file in ~/Downloads (an empty stand-in: start-up
    only finds the default model, it loads nothing)."""
    [block] = [b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if "~/.imagine/models" in b]
    copy, start = block.strip().splitlines()
    (tmp_path / "Downloads").mkdir()
    (tmp_path / "Downloads" / "dreamshaper_8.safetensors").write_bytes(b"")
    env = {**os.environ, "HOME": str(tmp_path), "IMAGINE_PORT": str(free_port()), "IMAGINE_DEVICE": "cpu"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    subprocess.run(["bash", "-euo", "pipefail", "-c", copy], env=env, check=True)
    server = subprocess.Popen(shlex.split(start), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        log = read_log_until_listening(server)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "default model dreamshaper_8" in "".join(log)


@pytest.mark.parametrize("feature, warned", [(None, True), ("avx512_bf16", False), ("amx", False)])
def test_16_bit_on_a_cpu_that_emulates_bfloat16_is_honoured_with_one_warning_line(feature, warned, monkeypatch, caplog):
    monkeypatch.setattr("engine.devices.cpu_bf16_feature", lambda: feature)
    with caplog.at_level("INFO", logger="imagine"):
        assert pick_dtype("16", torch.device("cpu")) == torch.bfloat16
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    if warned:
        [warning] = warnings
        assert "emulated" in warning and "20x slower than float32" in warning and "-f 32" in warning
    else:
        assert warnings == []


def test_auto_precision_never_warns_about_emulated_bfloat16(monkeypatch, caplog):
    monkeypatch.setattr("engine.devices.cpu_bf16_feature", lambda: None)
    with caplog.at_level("INFO", logger="imagine"):
        assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


# Round three (issue 38): what a new user hit following the README word for word.


def start_up_error(*flags: str, port: int | None = None) -> str:
    """The one line a server that cannot start ends with."""
    command = [sys.executable, str(ROOT / "imagine.py"), *flags, "-d", "cpu", "-f", "32", "--port", str(port or 1)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()[-1]


def test_a_port_another_imagine_holds_is_said_to_be_and_p_is_suggested(start_server, tmp_path):
    port = free_port()
    start_server(port)
    line = start_up_error("--models-dir", str(tmp_path), port=port)
    assert line.startswith(
        f"imagine: cannot listen on 127.0.0.1:{port}: Address already in use: another Imagine server"
    )
    assert line.endswith(f"stop it, or start this one on another port with -p (e.g. -p {port + 1})")


def test_a_port_another_program_holds_is_said_to_be(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        line = start_up_error("--models-dir", str(tmp_path), port=port)
    assert line.endswith(f"Address already in use: another program; stop it, or start this one on another port with "
                         f"-p (e.g. -p {port + 1})")  # fmt: skip


def test_a_models_folder_that_does_not_exist_is_named_first_as_why_the_default_model_is_not_found(tmp_path):
    missing = tmp_path / "ComfyUI" / "models"
    line = start_up_error("--models-dir", str(missing), "--model", "z_image_turbo_bf16")
    assert line == (
        f"imagine: the default model 'z_image_turbo_bf16' (--model, IMAGINE_MODEL) cannot be found: the models folder "
        f"{missing} does not exist (--models-dir, IMAGINE_MODELS_DIR)"
    )


def test_a_long_picture_logs_its_progress_at_a_steady_pace_and_says_in_its_answer_that_it_takes_minutes(
    client, monkeypatch, caplog
):
    monkeypatch.setattr(engine.engine, "PROGRESS_LOG_SECONDS", 0)
    monkeypatch.setattr(engine.engine, "LONG_PICTURE_SECONDS", 0)
    caplog.set_level("INFO", logger="imagine")
    answer = client.post("/generate", json={"prompt": "a cat", **FAST}).get_json()
    steps = [record.getMessage() for record in caplog.records if record.getMessage().startswith("step ")]
    assert steps[0].startswith("step 1/4 took") and [line[:9] for line in steps[1:]] == ["step 2/4;", "step 3/4;"]
    [notice] = answer["notices"]
    assert notice.startswith("this picture takes about 1 minutes here (") and "s a step, 4 steps)" in notice


def test_a_file_cut_off_in_its_header_says_it_is_truncated_with_its_size_and_what_to_do(make_engine, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b'{"model.diffusion_model.x": {"dtype": "F16", "sha')
    client = imagine.create_app(make_engine(model="demo")).test_client()
    error = client.post("/generate", json={"prompt": "a cat", "model": "cut", **FAST}).get_json()["error"]
    assert error.startswith(f"the file is truncated: it holds {path.stat().st_size} bytes where its header says 5008")
    assert "Download it again" in error


NOT_JSON = "the body is not valid JSON: "


@pytest.mark.parametrize(
    "body, words",
    [
        ('{"prompt": "a cat",}', NOT_JSON + "Expecting property name enclosed in double quotes at line 1, column 20"),
        (b'{"prompt": "\xff"}', NOT_JSON + "it is not UTF-8 text"),
        ('["a cat"]', 'the body must be a JSON object, e.g. {"prompt": "a cat"}'),
    ],
)
def test_a_body_that_is_no_json_object_says_what_is_wrong_and_where(client, body, words):
    response = client.post("/generate", data=body, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"] == words
