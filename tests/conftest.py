"""Fixtures and helpers the test modules share: a real engine on the tiny demo model, a Flask test client, servers,
tiny models on disk (SD1, SDXL and SD2 checkpoints, a ComfyUI folder of flow models), the CLI and the web page.
Bulkier groups of helpers live in modules of their own beside it (tiny_pipelines, flow_models, jobs_client, ...)."""

import base64
import collections
import contextlib
import importlib.util
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
import requests
from diffusion_model_files import write_tiny_transformer_configs
from encoder_files import write_tiny_encoder_configs
from flow_models import write_comfyui_folder
from ldm_checkpoint import save_ldm_checkpoint
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from tiny_pipelines import save_configs, tiny_sd2, tiny_sdxl
from waitress import wasyncore

import imagine
from engine.demo import build_demo_pipeline
from engine.engine import Engine
from engine.ksampling import KDiffusionScheduler
from engine.noise import PictureNoise
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


def noise_picture(width=64, height=64, seed=0) -> Image.Image:
    """A picture of random pixels, for img2img and inpainting."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def square_mask(size=(64, 64), box=(24, 24, 40, 40)) -> Image.Image:
    """An inpainting mask: white (repaint) inside `box`, black (keep) elsewhere."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def save_tiny_folder(path: Path, seed: int) -> Path:
    """A diffusers-format folder of a tiny random model (a few MB), other weights than the demo's."""
    build_demo_pipeline(CONFIGS_DIR / "sd1", seed=seed).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory, monkeypatch) -> Path:
    """A state folder of the test's own (IMAGINE_STATE_DIR) for every server it starts: none keeps its jobs in
    ~/.imagine, and none takes back another test's."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("IMAGINE_STATE_DIR", str(path))
    return path


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


def module_at(model, path: str):
    """A module of a loaded model's pipeline by its dotted path, e.g. 'unet.mid_block'."""
    module = model.txt2img
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@pytest.fixture
def make_engine(tmp_path):
    """Builds a fresh engine with its own settings (and `generate`, e.g. a Hold's, and `configs_dir`), for tests that
    hold or fail a generation, count loads or change limits; each is stopped when the test ends."""
    engines = []

    def make(generate=None, configs_dir=CONFIGS_DIR, **settings):
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
        command += ["--state-dir", str(tmp_path / f"state-{port}")]  # beside another server the test starts
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        return f"http://127.0.0.1:{port}", read_log_until_listening(process)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


CLI = Path(__file__).resolve().parent.parent / "imagine-cli.py"
TINY = ["-w", "64", "-h", "64", "-n", "4", "--seed", "42"]  # the CLI's flags for FAST


@pytest.fixture(scope="module")
def cli():
    """imagine-cli.py imported as a module, for tests that call main() in this process."""
    spec = importlib.util.spec_from_file_location("imagine_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args, cwd, server=None, env_extra=None, **options):
    """Runs imagine-cli.py in a process of its own, as a user does; the server and key of this environment are
    left out, so only `server` and `env_extra` give them."""
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGINE_SERVER", "IMAGINE_API_KEY")}
    if server:
        env["IMAGINE_SERVER"] = server
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **options
    )


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


def post_in_background(url, body, results):
    """POSTs `body` to /generate on a thread of its own, which appends (status, JSON answer) to `results`; returns
    the started thread."""

    def post():
        response = requests.post(f"{url}/generate", json=body, timeout=120)
        results.append((response.status_code, response.json()))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


# /health must answer at once while any request runs; this bound only catches a server held for seconds (the
# attacks of issue 25 held it 13-86 s); the slowest answer measured is printed (pytest -s) for the
# performance figures.
HEALTH_BOUND = 1.0


def health_while(url, attack):
    """Runs `attack()` on a thread and asks /health through waitress until it ends; returns (the attack's answer,
    the slowest /health answer in seconds)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=attack()), daemon=True)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        started = time.perf_counter()
        assert requests.get(f"{url}/health", timeout=300).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.01)
    thread.join()
    print(f"slowest /health while the attack ran: {slowest * 1000:.1f} ms")
    return result["answer"], slowest


# ---- the web page in the browser


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


def open_page(browser, url):
    """Opens the page and waits until it has listed the models and the samplers."""
    browser.get(url)
    wait_until(lambda: element(browser, "status").text in ("ready", ""), "the page loaded its lists")
    wait_until(lambda: element(browser, "sampler").get_attribute("value"), "the samplers are listed")


def severe_console_messages(browser) -> list:
    """The browser console's errors since the last call."""
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def element(browser, id_):
    """The page's element of this id."""
    return browser.find_element(By.ID, id_)


def set_field(browser, id_, value):
    """Types `value` into a field in place of what it held."""
    field = element(browser, id_)
    field.clear()
    field.send_keys(str(value))


def fill_form(browser, prompt, steps, seed, size=64):
    """Fills in the prompt, a square size, the steps and a fixed seed (unticking "random seed")."""
    set_field(browser, "prompt", prompt)
    set_field(browser, "width", size)
    set_field(browser, "height", size)
    set_field(browser, "num_steps", steps)
    if element(browser, "random-seed").is_selected():
        element(browser, "random-seed").click()
    set_field(browser, "seed", seed)


def finished(browser):
    """Whether the page says it has finished the picture."""
    return element(browser, "status").text.startswith("done")


# ---- tiny SDXL and SD2 single-file checkpoints


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(models dir, configs root, source pipelines): tiny SDXL and SD2 files in the LDM layout, and a
    configs root with sdxl, sd2 and sd2-v folders that fit them."""
    root = tmp_path_factory.mktemp("families")
    models, configs = root / "models", root / "configs"
    models.mkdir()
    sources = {"sdxl": tiny_sdxl(), "sd2": tiny_sd2("epsilon"), "sd2-v": tiny_sd2("v_prediction")}
    for name, pipe in sources.items():
        save_configs(pipe, configs / name)
    save_ldm_checkpoint(sources["sdxl"], models / "xl.safetensors", family="sdxl")
    for name in ("sd2-plain", "sd2-eps", "sd2-v"):
        save_ldm_checkpoint(sources["sd2"], models / f"{name}.safetensors", family="sd2")
    # What Stability's v2-inference.yaml and v2-inference-v.yaml say, shortened.
    (models / "sd2-eps.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n    image_size: 64\n")
    (models / "sd2-v.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    image_size: 96\n')
    return models, configs, sources


@pytest.fixture(scope="module")
def tiny_engine(tiny_files):
    """An engine on tiny_files' models and configs, default model 'xl', in float32."""
    models, configs, _ = tiny_files
    engine = Engine(imagine.Settings(model="xl", models_dir=models, max_loaded=4, fp_prec="32"), configs_dir=configs)
    engine.start()
    return engine


def answer(engine, **fields):
    """The answer of /generate on `engine` to 'a cat' at FAST settings with `fields`; fails the test on any error."""
    response = imagine.create_app(engine).test_client().post("/generate", json={"prompt": "a cat", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def bare_call(pipe, scheduler_config, **options):
    """The same picture from the source pipeline, called directly with the server's default sampler (A1111's
    DPM++ 2M on its Karras schedule) and the seed's CPU noise."""
    pipe.scheduler = KDiffusionScheduler.for_model(dict(scheduler_config), "dpm++ 2m")
    noise = PictureNoise("cpu", [FAST["seed"]], (4, options["height"] // 8, options["width"] // 8))
    pipe.scheduler.use_noise(noise)
    image = pipe(
        "a cat",
        negative_prompt="",
        num_inference_steps=FAST["num_steps"],
        guidance_scale=7.0,
        latents=noise.next(),
        **options,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


# ---- tiny flow models (Z-Image, FLUX.2 klein, FLUX.1) in a ComfyUI models folder


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    """The shipped configs and tokenizers, with the tiny flow models' numbers in place of the full-size ones."""
    configs = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(CONFIGS_DIR, configs, symlinks=True)
    write_tiny_transformer_configs(configs)
    write_tiny_encoder_configs(configs)
    return configs


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory) -> Path:
    """ComfyUI's models folder of tiny flow models, as flow_models.write_comfyui_folder writes it."""
    models = tmp_path_factory.mktemp("ComfyUI") / "models"
    write_comfyui_folder(models)
    return models


@pytest.fixture(scope="module")
def flow_engine(comfyui, tiny_configs):
    """An engine on the ComfyUI folder and the tiny configs, one model loaded at a time; stopped at the end."""
    engine = Engine(imagine.Settings(model="demo", models_dir=comfyui, max_loaded=1), configs_dir=tiny_configs)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def flow_client(flow_engine):
    """A Flask test client on the flow engine."""
    return imagine.create_app(flow_engine).test_client()


@pytest.fixture
def offline(request):
    """The network blocked (no_network) for a test, unless it serves over loopback (a fixture named
    over_loopback...); the flow modules ask it for every test (pytestmark)."""
    if not any(name.startswith("over_loopback") for name in request.fixturenames):
        request.getfixturevalue("no_network")


def pytest_terminal_summary(terminalreporter):
    """One line for each reason tests were skipped, at the end of the run: a run without chromium or k-diffusion says
    what it left out and how to have it."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"skipped {count} test{'s' if count > 1 else ''}: {reason}")
