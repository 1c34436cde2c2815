"""One generation at a time, a bounded queue, cancelling when the client leaves, failures and SIGTERM contained."""

import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import FAST, free_port, post_in_background, read_log_until_listening, wait_until

import imagine
from api.channel import HALF_CLOSE_GRACE
from engine import pipeline
from engine.engine import Engine

ROOT = Path(imagine.__file__).resolve().parent
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]  # Linux's system call for a signal to one thread


def record_jobs(engine, monkeypatch) -> list:
    """Records every job the engine accepts, for the rest of the test."""
    jobs = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        jobs.append(submit(*args, **kwargs))
        return jobs[-1]

    monkeypatch.setattr(engine, "submit", recording_submit)
    return jobs


# ---- the bounded queue


def one_running_one_waiting(url, engine, results) -> tuple:
    """Posts seed 1, which starts generating (held by a Hold), then seed 2, which waits; returns their threads."""
    running = post_in_background(url, {"prompt": "x", **FAST, "seed": 1}, results)
    wait_until(lambda: engine.running is not None, "the first request runs")
    waiting = post_in_background(url, {"prompt": "x", **FAST, "seed": 2}, results)
    wait_until(lambda: engine.jobs.qsize() == 1, "the second request waits")
    return running, waiting


def test_a_full_queue_answers_503_with_retry_after_and_every_accepted_request_completes(make_engine, serve, hold):
    held = hold(1)
    engine = make_engine(model="demo", max_queue=1, generate=held.generate)
    url = serve(engine)
    results = []
    running, waiting = one_running_one_waiting(url, engine, results)

    refused = requests.post(f"{url}/generate", json={"prompt": "x", **FAST, "seed": 3}, timeout=30)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "busy" in refused.json()["error"]

    held.release()
    running.join()
    waiting.join()
    assert sorted((status, body["seed"]) for status, body in results) == [(200, 1), (200, 2)]


def test_the_queue_length_comes_from_a_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGINE_MAX_QUEUE", "3")
    assert imagine.parse_settings([]).max_queue == 3
    assert imagine.parse_settings(["--max-queue", "0"]).max_queue == 0


# ---- cancelling when the client leaves


def open_request(url, body) -> socket.socket:
    """Sends a POST by hand, so the test can hang up whenever it likes."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)))
    connection.sendall(
        b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return connection


@pytest.mark.parametrize("stream", [1, 0])
def test_a_client_that_leaves_stops_its_generation_within_a_step_and_the_next_starts_at_once(
    make_engine, serve, monkeypatch, hold, stream
):
    held = hold(2)
    engine = make_engine(model="demo", generate=held.generate)
    url = serve(engine)
    jobs = record_jobs(engine, monkeypatch)
    connection = open_request(url, {"prompt": "x", **FAST, "num_steps": 50, "stream": stream})
    wait_until(lambda: held.steps == [1, 2], "the generation reaches step 2")
    time.sleep(HALF_CLOSE_GRACE)  # sooner, leaving reads as a client that only shut its sending side
    connection.close()
    wait_until(lambda: jobs[0].cancelled(), "the server notices the client has gone")
    held.release()
    wait_until(lambda: engine.running is None, "the cancelled generation ends")
    assert held.steps == [1, 2]  # step 2 finished, then nothing more ran

    response = requests.post(f"{url}/generate", json={"prompt": "x", **FAST}, timeout=60)
    assert response.status_code == 200


def test_a_streaming_client_that_leaves_just_after_a_preview_line_is_cancelled_not_taken_for_half_closed(
    make_engine, serve, monkeypatch, hold
):
    held = hold(1, 3)
    engine = make_engine(model="demo", generate=held.generate)
    url = serve(engine)
    jobs = record_jobs(engine, monkeypatch)
    connection = open_request(url, {"prompt": "x", **FAST, "num_steps": 50, "stream": 1})
    wait_until(lambda: held.steps == [1], "the generation reaches step 1")
    time.sleep(HALF_CLOSE_GRACE)  # the request is older than the grace ...
    held.release(1)
    received = b""
    while received.count(b'"step"') < 2:  # ... and the last preview line only just went out
        received += connection.recv(65536)
    wait_until(lambda: held.steps == [1, 2, 3], "the generation is held at step 3")
    connection.close()
    wait_until(lambda: jobs[0].cancelled(), "the server notices the client has gone")
    held.release(3)
    wait_until(lambda: engine.running is None, "the cancelled generation ends")
    assert held.steps == [1, 2, 3]


def test_a_request_whose_client_left_while_it_waited_is_dropped_without_running(make_engine, serve, monkeypatch, hold):
    held = hold(1)
    engine = make_engine(model="demo", generate=held.generate)
    url = serve(engine)
    jobs = record_jobs(engine, monkeypatch)
    results = []
    running = post_in_background(url, {"prompt": "x", **FAST, "seed": 1}, results)
    wait_until(lambda: engine.running is not None, "the first request runs")
    connection = open_request(url, {"prompt": "x", **FAST, "seed": 2})
    wait_until(lambda: len(jobs) == 2, "the second request is queued")
    time.sleep(HALF_CLOSE_GRACE)  # sooner, leaving reads as a client that only shut its sending side
    connection.close()
    wait_until(lambda: jobs[1].client_gone(), "the server notices the client has gone")
    held.release()
    running.join()
    wait_until(lambda: engine.jobs.empty() and engine.running is None, "the queue drains")
    assert results[0][0] == 200
    assert held.steps == [1, 2, 3, 4]  # only the first request's four steps ran


# ---- failures


def test_out_of_memory_answers_an_error_unloads_the_models_and_the_server_keeps_serving(make_engine):
    calls = []

    def out_of_memory_the_second_time(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return pipeline.generate(*args, **kwargs)

    engine = make_engine(model="demo", generate=out_of_memory_the_second_time)
    client = imagine.create_app(engine).test_client()
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200
    response = client.post("/generate", json={"prompt": "x", **FAST})
    assert response.status_code == 500
    assert "ran out of memory" in response.get_json()["error"]
    assert engine.models.loaded == {}
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200


@pytest.fixture
def server_process(tmp_path):
    """imagine.py as its own process on the demo model; yields (process, url)."""
    port = free_port()
    command = [sys.executable, str(ROOT / "imagine.py"), "--model", "demo", "--models-dir", str(tmp_path)]
    process = subprocess.Popen([*command, "--port", str(port), "-d", "cpu"], stderr=subprocess.PIPE, text=True)
    read_log_until_listening(process)
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its log from filling the pipe
    yield process, f"http://127.0.0.1:{port}"
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_cancels_the_running_generation_tells_its_client_and_exits_cleanly(server_process):
    process, url = server_process
    body = {"prompt": "x", "width": 256, "height": 256, "num_steps": 150, "stream": 1, "seed": 1}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=120) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["step"] == 1
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines]
    assert rest[-1] == {"error": "the server is shutting down", "done": True}
    assert len(rest) < 150
    assert process.wait(timeout=60) == 0


def test_an_idle_server_exits_on_sigterm_that_the_kernel_hands_to_another_of_its_threads(server_process):
    # The kernel may give a process's signal to any of its threads (on a GPU machine it gave it to CUDA's), and
    # Python runs the handler only once its main thread runs: an idle server must not wait for its next request.
    process, _ = server_process
    other_threads = [int(tid) for tid in os.listdir(f"/proc/{process.pid}/task") if int(tid) != process.pid]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_TGKILL, process.pid, other_threads[0], signal.SIGTERM) == 0
    assert process.wait(timeout=30) == 0


def test_stopping_tells_the_running_and_the_waiting_clients_and_ends_the_engine_thread(tmp_path, serve, hold):
    held = hold(1)
    engine = Engine(imagine.Settings(model="demo", models_dir=tmp_path), generate=held.generate)
    url = serve(engine)
    engine_thread = engine.start()
    results = []
    running, waiting = one_running_one_waiting(url, engine, results)
    wait_until(lambda: held.steps, "the running request is held after its first step")
    engine.stop()
    held.release()
    running.join()
    waiting.join()
    engine_thread.join(timeout=60)
    assert not engine_thread.is_alive()
    assert results == [(503, {"error": "the server is shutting down"})] * 2
    assert held.steps == [1]
    late = requests.post(f"{url}/generate", json={"prompt": "x", **FAST}, timeout=30)
    assert (late.status_code, late.json()) == (503, {"error": "the server is shutting down"})
