#!/usr/bin/env python3
"""Imagine: a small local HTTP server for Stable Diffusion, in the spirit of Ollama.

    python imagine.py --model demo          # a tiny random model: proves the path, draws noise
    curl -s localhost:5000/generate -H 'Content-Type: application/json' -d '{"prompt": "a cat"}'

This file is the map: the settings table (read before the heavy libraries are imported, so that --help answers
at once), the wiring of the engine (engine/: models and generation, no HTTP) to the routes (api/: Imagine's own
API, AUTOMATIC1111's and OpenAI's dialects, the guard and the server), and main().
"""

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import socket
import threading
import urllib.parse
from pathlib import Path

from engine.logs import shown_url
from engine.settings import MAX_BATCH, MAX_SIZE, MIN_SIZE, STATE_DIR, Settings

log = logging.getLogger("imagine")


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its flags, its IMAGINE_* variable, how the text is read, and its help."""

    name: str  # the Settings field, and IMAGINE_<NAME> upper-cased
    flags: tuple
    help: str  # ends with the default, as --help shows it
    kind: type = str  # bool: a switch, on with the flag or IMAGINE_<NAME>=1
    bare: str | None = None  # what the flag alone means, for a setting whose flag may come without a value


OPTIONS = (
    Option("host", ("--host",), "address to listen on (default 127.0.0.1)"),
    Option("port", ("-p", "--port"), "port (default 5000)", int),
    Option(
        "device",
        ("-d", "--device"),
        "auto | cpu | cuda | cuda:N | mps; auto picks cuda, then mps, then cpu; cuda:1 is the 2nd GPU (default auto)",
    ),
    Option(
        "fp_prec",
        ("-f", "--fp_prec"),
        "16 | 32 | auto: 16 on gpus and cpus with native bfloat16, else 32; bfloat16 on cpu (default auto)",
    ),
    Option("model", ("--model",), "default model: a name in the models directory, a path, or 'demo' (default demo)"),
    Option(
        "models_dir",
        ("--models-dir",),
        f"where named models live: one folder, or several separated by {os.pathsep!r}, searched in order "
        "(default ~/.imagine/models)",
        Path,
    ),
    Option(
        "max_loaded",
        ("--max-loaded",),
        "models kept loaded at once; the least recently used goes first (default 1)",
        int,
    ),
    Option(
        "prompt_cache",
        ("--prompt-cache",),
        "encoded prompts each loaded model keeps, so that a prompt drawn again skips its text encoders; 0 turns "
        "it off (default 100)",
        int,
    ),
    Option(
        "allow_downloads",
        ("--allow-downloads",),
        "let a model named like 'owner/repo' be fetched from the Hugging Face hub (default off)",
        bool,
    ),
    Option(
        "compile",
        ("--compile",),
        "auto | on | off: torch.compile the UNet (SD1.5, SDXL); auto where it pays: GPUs, and CPUs with native "
        "bfloat16 in bfloat16; a model's first picture then waits minutes for it, and the first to change a size "
        "(default auto)",
        bare="on",
    ),
    Option(
        "offload",
        ("--offload",),
        "none | model | sequential: keep a model's parts in CPU memory until each runs, for GPUs it does not fit; "
        "model moves whole parts, sequential one layer at a time (smallest cards, slowest) (default none)",
    ),
    Option(
        "max_size",
        ("--max-size",),
        f"largest width and height a request may ask for, a multiple of 8 (default {MAX_SIZE})",
        int,
    ),
    Option(
        "max_queue",
        ("--max-queue",),
        "requests that may wait while one generates; more get 503 with Retry-After (default 8)",
        int,
    ),
    Option(
        "max_batch",
        ("--max-batch",),
        f"most pictures one pipeline call draws: one request's n, or several requests' drawn together (default "
        f"{MAX_BATCH})",
        int,
    ),
    Option(
        "batch_wait_ms",
        ("--batch-wait-ms",),
        "milliseconds a request waits for others of the same model, size, steps, sampler and guidance to be drawn "
        "with it in one batch; 0 turns batching off; auto: 5 on a GPU, and on a CPU for pictures up to 256x256, "
        "where it measured faster (default auto)",
    ),
    Option(
        "rng",
        ("--rng",),
        "noise a seed gives when a request names none: cpu (torch's CPU numbers), gpu or nv (an NVIDIA GPU's, "
        "AUTOMATIC1111's default, on any device) (default cpu)",
        str,
    ),
    Option(
        "folder_timeout",
        ("--folder-timeout",),
        "seconds a request waits for the models folders to be read (a stalled disk or network mount) before it is "
        "answered 503 (default 10)",
        int,
    ),
    Option(
        "job_ttl",
        ("--job-ttl",),
        "seconds a finished job (POST /jobs) keeps its pictures for its client to collect (default 600)",
        int,
    ),
    Option(
        "max_jobs",
        ("--max-jobs",),
        "finished jobs kept at once, past which the oldest finished is freed first (default 64)",
        int,
    ),
    Option(
        "state_dir",
        ("--state-dir",),
        "where jobs (POST /jobs) are kept so that they outlive a restart: a database and the pictures beside it; "
        "one server a folder (default ~/.imagine)",
        Path,
    ),
    Option(
        "job_attempts",
        ("--job-attempts",),
        "times a job is started before the server stopping while it draws (a crash, an out-of-memory kill) fails it "
        "(default 2)",
        int,
    ),
    Option(
        "api_key",
        ("--api-key",),
        "require 'Authorization: Bearer KEY' on every request; prefer the variable: flags show in ps (default none)",
    ),
    Option(
        "cors_origins",
        ("--cors-origins",),
        "web origins allowed to call the server, comma-separated, e.g. http://localhost:3000, or * for any "
        "(default none)",
    ),
    Option("no_web", ("--no-web",), "turn the web page at / off, for a pure API server (default on)", bool),
    Option(
        "no_pull",
        ("--no-pull",),
        "turn pulling models by name (POST /pull) and removing them (DELETE /models/NAME) off (default on)",
        bool,
    ),
    Option(
        "queue",
        ("--queue",),
        "redis://HOST:PORT/DB: share one queue with every server on that Redis, which must be closed to clients; "
        "its password from IMAGINE_REDIS_PASSWORD, or redis://:PASSWORD@HOST... (default none: this server's own)",
    ),
)
SWITCHED_ON = ("1", "true", "yes")
# --compile was a switch (IMAGINE_COMPILE=1): its old spellings still mean on and off.
COMPILE_SPELLINGS = {**dict.fromkeys(SWITCHED_ON, "on"), **dict.fromkeys(("0", "false", "no"), "off")}
OFFLOADS = ("none", "model", "sequential")


def parse_settings(argv=None) -> Settings:
    """Reads flags, falling back to IMAGINE_* environment variables, then to the defaults."""
    parser = argparse.ArgumentParser(
        description="Imagine: a local Stable Diffusion server. POST /generate draws a picture; GET / lists every "
        "route (the web page in a browser).",
        epilog="Each flag falls back to the environment variable shown, e.g. IMAGINE_PORT=5001.",
    )
    defaults = Settings(state_dir=STATE_DIR)  # the server keeps its jobs; an engine alone (Settings()) keeps none
    for option in OPTIONS:
        env = f"IMAGINE_{option.name.upper()}"
        default = os.environ.get(env, getattr(defaults, option.name))
        if isinstance(default, tuple):  # a list setting (cors_origins) is comma-separated text in flags and variables
            default = ",".join(default)
        help = f"{option.help[:-1]}; {env})"
        if option.kind is bool:
            on = str(default).lower() in SWITCHED_ON
            parser.add_argument(*option.flags, dest=option.name, action="store_true", default=on, help=help)
        elif option.bare is not None:
            bare = {"nargs": "?", "const": option.bare}
            parser.add_argument(*option.flags, dest=option.name, **bare, default=default, help=help)
        else:
            parser.add_argument(*option.flags, dest=option.name, type=option.kind, default=default, help=help)
    args = parser.parse_args(argv)
    args.compile = COMPILE_SPELLINGS.get(args.compile.lower(), args.compile.lower())
    for problem in setting_problems(args):
        parser.error(problem)
    origins = tuple(origin.strip().rstrip("/") for origin in str(args.cors_origins).split(",") if origin.strip())
    paths = {"models_dir": Path(args.models_dir).expanduser(), "state_dir": Path(args.state_dir).expanduser()}
    return Settings(**{**vars(args), **paths, "cors_origins": origins})


def setting_problems(args) -> list:
    """What is wrong with the settings, each naming its flag and value."""
    checks = [
        (args.device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", args.device),
         f"--device must be auto, cpu, cuda, cuda:N or mps, not {args.device!r}"),
        (args.fp_prec in ("auto", "16", "32"), f"--fp_prec must be 16, 32 or auto, not {args.fp_prec!r}"),
        (args.max_loaded >= 1, f"--max-loaded must be at least 1, not {args.max_loaded}"),
        (args.prompt_cache >= 0, f"--prompt-cache must be 0 or more, not {args.prompt_cache}"),
        (args.max_batch >= 1, f"--max-batch must be at least 1, not {args.max_batch}"),
        (args.batch_wait_ms == "auto" or args.batch_wait_ms.isdigit(),
         f"--batch-wait-ms must be auto or a whole number of milliseconds, not {args.batch_wait_ms!r}"),
        (args.max_queue >= 0, f"--max-queue must be 0 or more, not {args.max_queue}"),
        (args.rng in ("cpu", "gpu", "nv"), f"--rng must be cpu, gpu or nv, not {args.rng!r}"),
        (args.compile in ("auto", "on", "off"), f"--compile must be auto, on or off, not {args.compile!r}"),
        (args.offload in OFFLOADS, f"--offload must be none, model or sequential, not {args.offload!r}"),
        (args.job_ttl >= 1, f"--job-ttl must be at least 1 (seconds), not {args.job_ttl}"),
        (args.folder_timeout >= 1, f"--folder-timeout must be at least 1 (seconds), not {args.folder_timeout}"),
        (args.max_jobs >= 1, f"--max-jobs must be at least 1, not {args.max_jobs}"),
        (args.job_attempts >= 1, f"--job-attempts must be at least 1, not {args.job_attempts}"),
        (not args.queue or urllib.parse.urlsplit(args.queue).scheme in ("redis", "rediss", "unix"),
         f"--queue must be a redis://, rediss:// or unix:// URL, not {shown_url(args.queue)!r}"),
        (args.max_size >= MIN_SIZE and args.max_size % 8 == 0,
         f"--max-size must be a multiple of 8 from {MIN_SIZE}, not {args.max_size}"),
    ]  # fmt: skip
    return [problem for passed, problem in checks if not passed]


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

if __name__ == "__main__":
    parse_settings()  # exits here for --help or a bad flag; main() parses them again, in no time
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log.info("loading torch and diffusers...")  # 10 s or so on a small machine: the start is not stuck

# The heavy libraries (torch, diffusers) come with the engine, imported once the settings are parsed.
import requests  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from werkzeug.exceptions import HTTPException  # noqa: E402

from api import a1111, jobs, native, openai, pulls  # noqa: E402
from api.channel import create_server as create_waitress_server  # noqa: E402
from api.guard import guard, is_loopback  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.errors import ImagineError  # noqa: E402
from engine.files.folders import model_folders  # noqa: E402
from engine.fleet import Fleet, connect  # noqa: E402
from engine.fleet_jobs import FleetStore  # noqa: E402
from engine.held_jobs import JobStore  # noqa: E402
from engine.job_ledger import FolderUnusable, JobLedger  # noqa: E402
from engine.logs import escaped  # noqa: E402

DIALECTS = {"native": native, "jobs": jobs, "pulls": pulls, "openai": openai, "a1111": a1111}
# A URL that reached no route (404, 405) still gets its dialect's error shape, by the dialect's prefix.
PREFIXES = (("/v1/", "openai"), ("/sdapi/", "a1111"))


def create_app(engine: Engine, fleet: Fleet | None = None) -> Flask:
    """The Flask app: the guard in front, each dialect's routes, and errors in the shape of the dialect asked. With
    a `fleet` (--queue), every generation goes to the queue it shares with other servers."""
    app = Flask("imagine")
    app.config["MAX_CONTENT_LENGTH"] = native.MAX_BODY_BYTES  # larger bodies get 413 before they are read
    app.extensions["imagine.engine"] = engine
    app.extensions["imagine.slots"] = threading.BoundedSemaphore(engine.settings.max_queue + 1)
    if fleet is None:
        app.extensions["imagine.jobs"] = JobStore(engine, ledger=open_ledger(engine.settings))
    else:  # the fleet's jobs are kept in Redis, not in this server's state folder
        app.extensions["imagine.jobs"] = FleetStore(fleet)
        app.extensions["imagine.fleet"] = fleet
    # An event stream for each job the engine may hold; each holds a thread of its own (see create_server).
    app.extensions["imagine.streams"] = threading.BoundedSemaphore(engine.settings.max_queue + 1)
    guard(app, engine.settings)
    for dialect in DIALECTS.values():
        app.register_blueprint(dialect.blueprint)

    @app.errorhandler(ImagineError)
    def imagine_error(error):
        # AUTOMATIC1111 answers every bad value with 422, wherever it is found (a clip_skip beyond the model's
        # layers only by the engine): one status per dialect.
        status = 422 if error.status == 400 and current_dialect() == "a1111" else error.status
        response = jsonify(dialect_error(error))
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(error):
        response = error.get_response()  # keeps headers such as a 405's Allow
        response.set_data(json.dumps(dialect_error(ImagineError(error.description, error.code))))
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error):
        log.exception("unexpected error")
        return jsonify(dialect_error(ImagineError("internal error; the server log has the details", 500))), 500

    return app


def open_ledger(settings: Settings) -> JobLedger | None:
    """Where jobs outlive the process (--state-dir), taken for this server; None where the settings name no folder."""
    if settings.state_dir is None:
        return None
    ledger = JobLedger(settings.state_dir)
    log.info("jobs are kept in %s (--state-dir)", escaped(settings.state_dir))
    return ledger


def current_dialect() -> str:
    """The dialect the request spoke: its route's, or for a URL that reached no route, its prefix's."""
    return request.blueprint or next((name for prefix, name in PREFIXES if request.path.startswith(prefix)), "native")


def dialect_error(error: ImagineError) -> dict:
    """The error's JSON in the shape of the dialect the request spoke, whose clients read that shape."""
    return DIALECTS[current_dialect()].to_error(error)


def create_server(engine: Engine, host: str, port: int, fleet: Fleet | None = None):
    """The production HTTP server (waitress) serving the app on `engine` (and `fleet`)."""
    return create_waitress_server(create_app(engine, fleet), engine.settings.max_queue, host, port)


def check_default_model(engine: Engine) -> None:
    """Finds (does not load) the --model default, so that a mistyped name stops the start, not the first request."""
    settings = engine.settings
    try:
        engine.catalog.resolve(settings.model)
    except ImagineError as error:
        folders = model_folders(settings.models_dir)
        missing = [str(folder) for folder in folders if not folder.is_dir()]
        where = f"the models folders {', '.join(str(folder) for folder in folders)} (--models-dir, IMAGINE_MODELS_DIR)"
        why = f"is neither in {where} nor a path to a model" if error.status == 404 else f"cannot be used: {error}"
        if missing and error.status == 404:  # most likely the mistake: say it first
            why = f"cannot be found: the models folder {', '.join(missing)} does not exist (--models-dir, "
            why += "IMAGINE_MODELS_DIR)"
        raise SystemExit(f"imagine: the default model {settings.model!r} (--model, IMAGINE_MODEL) {why}") from None


def check_models_folders(settings: Settings) -> None:
    """Creates the default models folder on the first run, where a new user then puts models; a folder the user
    named and that is missing is more likely a typo, so it is only warned about."""
    for folder in model_folders(settings.models_dir):
        if folder.is_dir():
            continue
        try:
            if settings.models_dir == Settings().models_dir:
                folder.mkdir(parents=True)
                log.info("created the models folder %s; put models there (--models-dir names others)", escaped(folder))
                continue
        except OSError as error:
            log.warning("cannot create the models folder %s: %s", escaped(folder), error.strerror)
        log.warning("models folder %s does not exist; models there cannot be found (--models-dir)", escaped(folder))


def cannot_listen(settings: Settings, error: OSError) -> str:
    """Why the server cannot start on its port, and what to do: where the port is taken, another Imagine (its /health
    answers as Imagine's does) may be what holds it."""
    message = f"imagine: cannot listen on {settings.host}:{settings.port}: {error.strerror}"
    if error.errno != errno.EADDRINUSE:
        return message
    try:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        answer = requests.get(f"http://{host}:{settings.port}/health", timeout=2).json()
    except (requests.RequestException, ValueError):
        answer = None
    holder = "another Imagine server is running there" if answer and answer.get("status") == "ok" else "another program"
    return f"{message}: {holder}; stop it, or start this one on another port with -p (e.g. -p {settings.port + 1})"


def join_fleet(engine: Engine, settings: Settings) -> Fleet | None:
    """With --queue, this server's part of the fleet on that Redis, drawing jobs; the start ends where Redis cannot
    be reached."""
    if not settings.queue:
        return None
    fleet = Fleet(connect(settings.queue), engine, f"{socket.gethostname()}:{settings.port}", settings.queue)
    fleet.start()
    log.info("sharing the queue at %s", shown_url(settings.queue))
    return fleet


def stop(engine: Engine, fleet: Fleet | None) -> None:
    if fleet is not None:
        fleet.stop()
    engine.stop()


def main(argv=None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    engine = Engine(settings)
    check_default_model(engine)
    log.info(
        "device %s, precision %s, default model %s, models folders %s",
        engine.device, str(engine.dtype).removeprefix("torch."), escaped(settings.model), escaped(settings.models_dir),
    )  # fmt: skip
    check_models_folders(settings)
    fleet = join_fleet(engine, settings)
    try:
        server = create_server(engine, settings.host, settings.port, fleet)
    except FolderUnusable as error:
        raise SystemExit(str(error)) from None
    except OSError as error:
        raise SystemExit(cannot_listen(settings, error)) from None
    # SIGTERM (systemctl stop) and Ctrl-C cancel the running and waiting requests, then main() returns; in a fleet,
    # the jobs this server drew go back to the fleet first (Fleet.stop).
    # The handler only sets an event: stop() takes locks that the interrupted main thread may hold.
    stop_requested = threading.Event()
    threading.Thread(target=lambda: stop_requested.wait() and stop(engine, fleet), name="stop", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    threading.Thread(target=server.run, name="http", daemon=True).start()
    if settings.api_key:
        log.info("every request needs the API key (Authorization: Bearer KEY); / and GET /health answer without it")
    elif not is_loopback(settings.host):
        log.warning("other machines can reach this server and no API key is set: anyone may use it (IMAGINE_API_KEY)")
    log.info("listening on http://%s:%d", settings.host, settings.port)
    engine.run_forever()
    # Let the HTTP threads send their last answers (the cancelled job's error) before the process ends.
    server.task_dispatcher.shutdown(timeout=10)
    log.info("stopped")


if __name__ == "__main__":
    main()
