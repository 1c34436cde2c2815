"""What a new user following the README met (issue 22): field names shared with the other dialects, the model
lists, the health check behind a key, the words of errors and logs, and what the CLI and server say first."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, decode_png, free_port, pixels, png_data, read_log_until_listening, serving
from PIL import Image

import imagine
from engine.samplers import SAMPLER_NAMES, sampler_label

ROOT = Path(__file__).resolve().parent.parent


def test_generate_takes_negative_prompt_and_steps_as_the_other_dialects_name_them(client):
    seed_names = client.post("/generate", json={"prompt": "x", **FAST, "neg": "blur", "num_steps": 3}).get_json()
    fast = {key: value for key, value in FAST.items() if key != "num_steps"}
    aliases = client.post("/generate", json={"prompt": "x", **fast, "negative_prompt": "blur", "steps": 3})
    assert aliases.status_code == 200, aliases.get_json()
    assert aliases.get_json()["steps"] == 3
    assert "Negative prompt: blur\nSteps: 3," in decode_png(aliases.get_json()["img"]).info["parameters"]
    assert (pixels(aliases.get_json()["img"]) == pixels(seed_names["img"])).all()


def test_an_alias_and_its_field_given_with_different_values_answer_400_naming_both(client):
    fast = {key: value for key, value in FAST.items() if key != "num_steps"}
    response = client.post("/generate", json={"prompt": "x", **fast, "steps": 3, "num_steps": 4})
    assert response.status_code == 400
    assert response.get_json()["error"] == "steps and num_steps are one field; give one of them, not 3 and 4"
    response = client.post("/generate", json={"prompt": "x", **FAST, "negative_prompt": "a", "neg": "b"})
    assert response.status_code == 400
    assert "negative_prompt and neg" in response.get_json()["error"]
    same = client.post("/generate", json={"prompt": "x", **FAST, "negative_prompt": "a", "neg": "a"})
    assert same.status_code == 200


def test_with_a_key_health_answers_a_load_balancer_without_it_but_tells_only_that_the_server_is_up(make_engine):
    client = imagine.create_app(make_engine(model="demo", api_key="the-key")).test_client()
    for headers in ({}, {"Authorization": "Bearer a-wrong-key"}):
        response = client.get("/health", headers=headers)
        assert response.status_code == 200
        assert response.get_json() == {"status": "ok"}
    full = client.get("/health", headers={"Authorization": "Bearer the-key"}).get_json()
    assert full == {"status": "ok", "device": "cpu", "loaded": [], "queue": 0, "running": False}
    assert client.get("/models").status_code == 401  # the rest still needs the key


def test_without_a_key_health_tells_everything_as_before(client):
    assert set(client.get("/health").get_json()) == {"status", "device", "loaded", "queue", "running"}


def test_demo_is_listed_as_built_in_first_in_get_models(client):
    assert client.post("/generate", json={"prompt": "x", **FAST, "model": "demo"}).status_code == 200
    models = client.get("/models").get_json()["models"]
    assert models[0] == {
        "name": "demo", "family": "sd1", "size": 0, "modified": None, "loaded": True, "builtin": True
    }  # fmt: skip
    assert [(model["name"], model["builtin"]) for model in models[1:]] == [("tiny", False)]


def test_the_a1111_and_openai_lists_name_demo_once_and_every_folder_model(client):
    a1111 = [model["title"] for model in client.get("/sdapi/v1/sd-models").get_json()]
    assert a1111 == ["demo", "tiny"]
    openai = [model["id"] for model in client.get("/v1/models").get_json()["data"]]
    assert openai == ["demo", "tiny"]


def test_cli_list_shows_demo_as_built_in(live_server):
    result = subprocess.run(
        [sys.executable, str(ROOT / "imagine-cli.py"), "--list", "--server", live_server],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "FAMILY", "SIZE", "LOADED"]
    assert rows[1][:4] == ["demo", "sd1", "built", "in"]
    assert [row[0] for row in rows[2:]] == ["tiny"]


def test_an_unknown_lora_is_refused_naming_loras_under_the_models_folders_not_the_servers_path(client, models_dir):
    response = client.post("/generate", json={"prompt": "x <lora:add_detail:0.5>", **FAST})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error.startswith("lora 'add_detail' not found in loras/ of the models folders (<models>/loras/, as ")
    assert str(models_dir) not in error and "GET /loras" in error


def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_the_servers_help_names_its_routes_not_one_endpoint():
    text = help_text("imagine.py")
    assert "one endpoint" not in text
    assert "POST /generate draws a picture; GET / lists every route" in text


def test_the_clis_help_names_every_sampler_of_the_servers_table():
    text = help_text("imagine-cli.py")
    for name in SAMPLER_NAMES:
        if not name.endswith(" karras"):
            assert f"{sampler_label(name)}," in text, name
    assert "schedule type" in text


def test_a_model_file_of_random_bytes_answers_422_cannot_be_read_as_a_checkpoint(make_engine, tmp_path):
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    client = imagine.create_app(make_engine(model="demo", models_dir=tmp_path)).test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "noise", **FAST})
    assert response.status_code == 422
    assert response.get_json()["error"].startswith("the model file cannot be read as a checkpoint (")
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200


def test_an_unknown_models_404_names_the_setting_and_the_list_without_claiming_to_show_the_folder(client, models_dir):
    error = client.post("/generate", json={"prompt": "x", "model": "dremshaper_8"}).get_json()["error"]
    assert error == (
        "model 'dremshaper_8' not found in the models folders (--models-dir, IMAGINE_MODELS_DIR); "
        "GET /models lists the models a request can name, 'demo' (built in) among them"
    )


def test_the_img2img_log_line_says_the_steps_that_run(client, caplog):
    start = png_data(Image.new("RGB", (64, 64), "teal"))
    with caplog.at_level("INFO", logger="imagine"):
        body = {"prompt": "x", "img": start, "num_steps": 10, "strength": 0.55, "seed": 1}
        answer = client.post("/generate", json=body).get_json()
    assert answer["steps"] == 5
    assert any(line.startswith("generating 1 x 64x64, 5 steps,") for line in caplog.messages), caplog.messages


def test_the_log_says_when_a_generation_starts_and_once_a_step_is_timed_how_long_is_left(client, caplog):
    with caplog.at_level("INFO", logger="imagine"):
        assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200
    started = next(i for i, line in enumerate(caplog.messages) if line.startswith("generating 1 x 64x64, 4 steps,"))
    estimates = [line for line in caplog.messages[started:] if line.startswith("step 1/")]
    assert len(estimates) == 1
    assert re.fullmatch(r"step 1/4 took \d+\.\d s; about \d+ s left", estimates[0])


def test_the_first_start_says_it_loads_torch_creates_the_default_models_folder_and_names_the_key(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGINE_")}
    env |= {"HOME": str(tmp_path), "IMAGINE_API_KEY": "the-key"}
    command = [sys.executable, str(ROOT / "imagine.py"), "--model", "demo", "-d", "cpu", "--port", str(free_port())]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        log = read_log_until_listening(process)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert log[0].rstrip().endswith("INFO loading torch and diffusers...")
    folder = tmp_path / ".imagine" / "models"
    assert folder.is_dir()
    assert any(f"INFO created the models folder {folder}; put models there" in line for line in log), log
    assert any("INFO every request needs the API key" in line for line in log), log
    assert not any("WARNING" in line for line in log), log
    assert "the-key" not in "".join(log)


def test_a_models_folder_the_user_named_is_not_created_but_warned_about(tmp_path, caplog):
    named = tmp_path / "modles"
    with caplog.at_level("INFO", logger="imagine"):
        imagine.check_models_folders(imagine.Settings(models_dir=named))
    assert not named.exists()
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert f"models folder {named} does not exist" in caplog.text


def test_the_clis_401_says_to_set_imagine_api_key(make_engine, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGINE_")}
    with serving(make_engine(api_key="the-key")) as url:
        result = subprocess.run(
            [sys.executable, str(ROOT / "imagine-cli.py"), "a cat", "-w", "64", "-h", "64", "--server", url],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("imagine: the server answered 401: ")
    assert line.endswith("; set IMAGINE_API_KEY to the server's key")


def project_with_venv(tmp_path: Path, venv: Path | None) -> Path:
    """A copy of the CLI (and the API client it imports) in a project folder, its .venv a link to `venv` (None: no
    .venv), and an `imagine` link to it elsewhere, as the README puts one on PATH."""
    project = tmp_path / "project"
    (project / "api").mkdir(parents=True)
    shutil.copy2(ROOT / "imagine-cli.py", project / "imagine-cli.py")
    shutil.copy2(ROOT / "api" / "client.py", project / "api" / "client.py")
    if venv is not None:
        (project / ".venv").symlink_to(venv)
    (tmp_path / "imagine").symlink_to(project / "imagine-cli.py")
    return tmp_path / "imagine"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests run in no virtual environment to link to")
def test_the_cli_started_by_a_python_outside_its_venv_runs_on_the_projects_venv(tmp_path):
    link = project_with_venv(tmp_path, Path(sys.prefix))
    outside = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "IMAGINE_CLI_IN_VENV")}
    result = subprocess.run(
        [sys._base_executable, "-c", "import tqdm"], capture_output=True, text=True, env=outside, timeout=60
    )
    assert result.returncode == 1  # the Python outside lacks the requirements, as the system's does
    result = subprocess.run(
        [sys._base_executable, str(link), "--help"], capture_output=True, text=True, env=outside, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: imagine")


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests run in no virtual environment to link to")
@pytest.mark.parametrize("venv_there, python", [(False, "venv"), (True, "venv"), (True, "outside")])
def test_a_missing_module_names_the_projects_venv_not_the_system_python(tmp_path, venv_there, python):
    link = project_with_venv(tmp_path, Path(sys.prefix) if venv_there else None)
    python = sys.executable if python == "venv" else sys._base_executable
    script = f"import runpy, sys; sys.modules['tqdm'] = None; runpy.run_path({str(link)!r})"
    result = subprocess.run([python, "-c", script, "a cat"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"imagine: this Python ({python}) has no module 'tqdm': ")
    venv, requirements = tmp_path / "project" / ".venv", tmp_path / "project" / "requirements.txt"
    if not venv_there:
        create = f"create Imagine's virtual environment: python3 -m venv {venv} && {venv}/bin/pip install -r "
        assert line.endswith(create + str(requirements))
    elif python == sys.executable:  # the project's venv runs, and lacks a requirement
        assert line.endswith(f"install its requirements: {python} -m pip install -r {requirements}")
    else:
        assert line.endswith(f"run the CLI with the Python of Imagine's virtual environment: {venv}/bin/python")
