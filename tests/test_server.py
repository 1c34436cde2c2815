"""The server as a user runs it: settings, the production WSGI server, live streaming, one job at a time."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import FAST, free_port

import imagine
from engine import pipeline
from engine.devices import pick_device, pick_dtype

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_environment(monkeypatch):
    for name in [name for name in os.environ if name.startswith("IMAGINE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_settings_default_to_a_local_server_on_port_5000(clean_environment):
    settings = imagine.parse_settings([])
    assert (settings.host, settings.port, settings.device, settings.fp_prec) == ("127.0.0.1", 5000, "auto", "auto")
    assert (settings.model, settings.max_loaded, settings.allow_downloads) == ("demo", 1, False)
    assert settings.models_dir == Path.home() / ".imagine" / "models"


def test_every_setting_comes_from_its_environment_variable(clean_environment):
    environment = {
        "HOST": "0.0.0.0",
        "PORT": "5055",
        "DEVICE": "cpu",
        "FP_PREC": "16",
        "MODEL": "dreamshaper_8",
        "MODELS_DIR": "/srv/models",
        "MAX_LOADED": "3",
        "ALLOW_DOWNLOADS": "true",
    }
    for name, value in environment.items():
        clean_environment.setenv(f"IMAGINE_{name}", value)
    expected = imagine.Settings("0.0.0.0", 5055, "cpu", "16", "dreamshaper_8", Path("/srv/models"), 3, True)
    expected.state_dir = Path.home() / ".imagine"  # the server's default: Settings() alone keeps no jobs
    assert imagine.parse_settings([]) == expected


def test_flags_override_environment_variables(clean_environment):
    clean_environment.setenv("IMAGINE_PORT", "5055")
    clean_environment.setenv("IMAGINE_ALLOW_DOWNLOADS", "false")
    settings = imagine.parse_settings(["-p", "6000", "--host", "::1", "-d", "cpu", "-f", "32", "--model", "x"])
    assert (settings.port, settings.host, settings.device, settings.fp_prec, settings.model) == (
        6000,
        "::1",
        "cpu",
        "32",
        "x",
    )
    assert settings.allow_downloads is False


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"


@pytest.mark.parametrize("argv", [["-d", "tpu"], ["-f", "8"], ["--max-loaded", "0"], ["-p", "http"]])
def test_bad_settings_stop_the_server_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        imagine.parse_settings(argv)
    assert argv[0] in capsys.readouterr().err


def test_16_bit_means_bfloat16_on_cpu_and_float16_on_gpus():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert pick_dtype("16", cpu) == torch.bfloat16
    assert pick_dtype("16", cuda) == pick_dtype("16", mps) == torch.float16
    assert pick_dtype("32", cpu) == pick_dtype("32", cuda) == torch.float32
    assert pick_dtype("auto", cuda) == torch.float16


def test_16_bit_on_cpu_loads_bfloat16_weights_and_still_draws(make_engine):
    engine = make_engine(fp_prec="16", device="cpu")
    client = imagine.create_app(engine).test_client()
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200
    model = engine.models.get("demo")
    assert model.txt2img.unet.dtype == model.img2img.vae.dtype == torch.bfloat16


def test_hub_downloads_are_attempted_only_when_allowed(make_engine):
    request = {"prompt": "x", "model": "someone/some-model", **FAST}
    refused = imagine.create_app(make_engine()).test_client().post("/generate", json=request)
    assert refused.status_code == 404
    # Allowed, the server really asks the hub; with no network here (or no such repo) that fails cleanly.
    allowed = imagine.create_app(make_engine(allow_downloads=True)).test_client().post("/generate", json=request)
    assert allowed.status_code == 502
    assert "could not be downloaded" in allowed.get_json()["error"]


def test_first_stream_line_arrives_well_before_the_generation_ends(live_server):
    body = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_steps": 20, "stream": 2, "seed": 1}
    started = time.perf_counter()
    arrivals = []
    with requests.post(f"{live_server}/generate", json=body, stream=True, timeout=120) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        for line in response.iter_lines():
            arrivals.append((time.perf_counter() - started, json.loads(line)))
    assert [line["done"] for _, line in arrivals] == [False] * 9 + [True]
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first < 0.5 * last, f"first line at {first:.2f} s, last at {last:.2f} s"


def test_concurrent_requests_run_one_at_a_time_and_all_complete(make_engine, serve):
    running, most = 0, 0
    lock = threading.Lock()

    def counting_generate(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return pipeline.generate(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    url = serve(make_engine(model="demo", generate=counting_generate))
    statuses = []

    def post(seed):
        response = requests.post(f"{url}/generate", json={"prompt": "x", **FAST, "seed": seed}, timeout=120)
        statuses.append((response.status_code, response.json()["seed"]))

    threads = [threading.Thread(target=post, args=(seed,)) for seed in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [(200, seed) for seed in range(5)]
    assert most == 1


def test_the_executable_serves_through_waitress_and_logs_its_choices(start_server):
    url, log = start_server(free_port())
    text = "".join(log)
    precision = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert f"precision auto: {precision}" in text  # with the reason: this CPU's bfloat16 support
    assert f"device cpu, precision {precision}, default model demo" in text
    response = requests.post(f"{url}/generate", json={"prompt": "a cat", **FAST}, timeout=60)
    assert response.status_code == 200 and response.json()["seed"] == 42
    assert response.headers["Server"] == "waitress"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_missing_device_stops_with_a_message():
    result = subprocess.run(
        [sys.executable, str(ROOT / "imagine.py"), "-d", "cuda"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "device 'cuda' is not available" in result.stderr
