"""Fixtures: a real engine on the tiny demo model, a Flask test client, and tiny models on disk."""

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from waitress import wasyncore

import imagine
from engine.demo import build_demo_pipeline
from engine.engine import Engine
from engine.pipeline import generate
from engine.settings import CONFIGS_DIR

# Small and quick: the tiny model draws 64x64 in a few steps in well under a second.
FAST = {"width": 64, "height": 64, "num_steps": 4, "seed": 42}


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


def pixels(data: str) -> np.ndarray:
    return np.asarray(decode_png(data).convert("RGB"), dtype=np.int16)


def assert_same_picture(one: np.ndarray, other: np.ndarray) -> None:
    """The same picture up to float rounding: a batch runs its matrix products in other shapes, which on some CPUs
    round differently, moving a pixel by a level of 255 here and there. Another seed moves the mean by some 50."""
    difference = np.abs(one.astype(int) - other.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def png_data(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def save_tiny_folder(path: Path, seed: int) -> Path:
    """A diffusers-format folder of a tiny random model (a few MB), other weights than the demo's."""
    build_demo_pipeline(CONFIGS_DIR / "sd1", seed=seed).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models directory holding one extra tiny model, as a diffusers folder named 'tiny'."""
    path = tmp_path_factory.mktemp("models")
    save_tiny_folder(path / "tiny", seed=1)
    return path


@pytest.fixture(scope="session")
def engine(models_dir):
    """One engine for the session, default model 'demo', its thread running generations."""
    engine = Engine(imagine.Settings(model="demo", models_dir=models_dir, max_loaded=2))
    engine.start()
    return engine


@pytest.fixture
def client(engine):
    """A Flask test client for the app on the shared engine."""
    return imagine.create_app(engine).test_client()


def count_loads(engine, monkeypatch) -> list:
    """Records every model the engine reads from disk or builds, for the rest of the test; a cache hit records
    nothing."""
    loads = []
    load = engine.models.load

    def counting_load(key, family):
        loads.append(key)
        return load(key, family)

    monkeypatch.setattr(engine.models, "load", counting_load)
    return loads


@pytest.fixture
def make_engine(tmp_path):
    """Builds a fresh engine with its own settings (and `generate`, e.g. a Hold's, and `configs_dir`), for tests that
    hold or fail a generation, count loads or change limits; each is stopped when the test ends."""
    engines = []

    def make(generate=generate, configs_dir=CONFIGS_DIR, **settings):
        settings.setdefault("models_dir", tmp_path)
        engines.append(Engine(imagine.Settings(**settings), configs_dir, generate))
        engines[-1].start()
        return engines[-1]

    yield make
    for engine in engines:
        engine.stop()


HOLD_SECONDS = 120  # how long a held generation waits to be released before it fails the test


class Hold:
    """A `generate` for an engine (make_engine(generate=hold.generate)): the real pipeline, stopped before the step
    callback of each step in `at` until the test releases that step, for every job from then on. `steps` records
    every step reached, in order."""

    def __init__(self, *at: int):
        self.steps = []
        self.gates = {}
        self.stop_at(*at)

    def stop_at(self, *steps: int) -> None:
        """Stops the generations from now on before `steps` (again, where they were released); `steps` starts anew."""
        self.gates |= {step: threading.Event() for step in steps}
        self.steps = []

    def generate(self, model, req, on_step=None, conditioning=None):
        def held_on_step(step, steps, latents):
            self.steps.append(step)
            if step in self.gates:
                assert self.gates[step].wait(HOLD_SECONDS), f"the test never released step {step}"
            return on_step(step, steps, latents)

        return generate(model, req, held_on_step, conditioning)

    def reached(self, step: int) -> None:
        """Waits until a generation has reached `step` (and, if it is held there, stopped before it)."""
        wait_until(lambda: step in self.steps, f"the generation reaches step {step}")

    def release(self, *steps: int) -> None:
        """Lets every generation go past `steps`, or past every held step where none are named."""
        for step in steps or self.gates:
            self.gates[step].set()


@pytest.fixture
def hold():
    """Makes a Hold at the given steps; each is released when the test ends, passed or failed, so that no engine
    thread stays stopped."""
    made = []

    def make(*at: int) -> Hold:
        made.append(Hold(*at))
        return made[-1]

    yield make
    for each in made:
        each.release()


@pytest.fixture
def live_server(engine):
    """The app served by waitress (the production server) on a free loopback port; yields its URL."""
    with serving(engine) as url:
        yield url


def save_config_folder(pipe, path: Path) -> Path:
    """What configs/sd1 is for the real model: a diffusers folder with configs and tokenizer, no weights."""
    pipe.save_config(path)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(path / name)
    pipe.text_encoder.config.save_pretrained(path / "text_encoder")
    pipe.tokenizer.save_pretrained(path / "tokenizer")
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def read_log_until_listening(process) -> list[str]:
    """The server process's log lines up to "listening on"; fails the test, showing the log, if it ends first."""
    log = []
    for line in process.stderr:
        log.append(line)
        if "listening on" in line:
            return log
    raise AssertionError("the server did not start:\n" + "".join(log))


@pytest.fixture
def start_server(tmp_path):
    """Starts `imagine-server` (a symlink to imagine.py, as the service installs it) with the demo model."""
    link = tmp_path / "imagine-server"
    link.symlink_to(Path(imagine.__file__).resolve())
    processes = []

    def start(port):
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        command = [str(link), "--model", "demo", "--models-dir", str(tmp_path), "--port", str(port), "-d", "cpu"]
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        return f"http://127.0.0.1:{port}", read_log_until_listening(process)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def serving(engine):
    """Serves `engine` through waitress on a free loopback port; yields its URL, and on leaving stops every
    thread of the server.

    waitress's own close() leaves its task threads running, and one that finishes answering a request after
    it wakes the server's loop by writing "x" to the loop's wake-up pipe, whose descriptor close() has
    already closed: by then that number may belong to a pipe the next test opened, such as a subprocess's
    stdout (which then began with a stray "x", under load only). So the task threads end first, then the
    loop closes everything from its own thread and ends.
    """
    server = imagine.create_server(engine, "127.0.0.1", free_port())
    loop = threading.Thread(target=server.run, name="waitress-loop", daemon=True)
    loop.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.task_dispatcher.shutdown()
        try:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))  # the listener, connections, pipe
        except OSError:  # the wake-up pipe is closed already (seen once, cause not found): close from here
            wasyncore.close_all(server._map)
        loop.join(timeout=30)


def wait_until(condition, what, timeout=60):
    """Polls for a state change the test caused; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.fixture
def serve():
    """Serves engines through imagine.create_server (waitress, as in production); yields a URL maker."""
    with contextlib.ExitStack() as servers:
        yield lambda engine: servers.enter_context(serving(engine))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Headless chromium; the test is skipped, saying why, where chromium or its driver is not installed."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "the browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
