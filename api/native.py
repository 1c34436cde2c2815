"""Imagine's own API (/generate and the lists), the web page, and respond(): the one response path that every
dialect's routes go through."""

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request, send_from_directory

from api.guard import has_key
from engine.engine import Engine
from engine.errors import ImagineError
from engine.job import Failed, Finished, Job, Loaded, Loading, Preview, Upscaled, due
from engine.loras import embedding_listing, lora_listing
from engine.previews import png_base64
from engine.request import GenerationRequest, parse_request
from engine.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES, schedules_for
from engine.schedules import LABELS, SCHEDULE_NAMES
from engine.settings import Settings
from engine.upscalers import UpscaleRequest, parse_upscale_request

log = logging.getLogger("imagine")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"  # the web page: index.html, its scripts and style
# The page's files (flat in web/); anything else under /web/ is a 404, so no path reaches the disk from a URL.
WEB_FILES = ("index.html", "app.js", "jobs.js", "models.js", "style.css")
MAX_BODY_BYTES = 64 * 2**20  # a request body; a large input picture as base64 PNG fits
# What parsing a body may cost: a /generate body is one flat object with a few dozen of the marks that make
# values ([, { and ,), and two prompts full of them stay far below this. Counting them is cheap; parsing
# a body of tens of MB of nested empty objects takes gigabytes.
MAX_JSON_MARKS = 50_000

# waitress keeps an answer or a request body in memory up to these sizes (its defaults), and beyond them in a
# temporary file (TMPDIR) until it is sent or read.
OUTBUF_OVERFLOW = 2**20
INBUF_OVERFLOW = 2**19

blueprint = Blueprint("native", __name__)


# ---------------------------------------------------------------------------------------------
# The one response path
# ---------------------------------------------------------------------------------------------


def current_engine() -> Engine:
    return current_app.extensions["imagine.engine"]


def current_queue():
    """Where generations queue: the engine's own queue, or a fleet's in Redis (--queue) whichever server draws them,
    both with Engine.submit's arguments."""
    return current_app.extensions.get("imagine.fleet") or current_engine()


def current_settings() -> Settings:
    return current_engine().settings


def take_generation_slot() -> Callable[[], None]:
    """Takes one of the slots for the requests the engine may hold (running or waiting), or refuses with the engine's
    503; returns what gives it back. Reading and checking a body holds a thread, so a request takes its slot before
    it is read. A stream keeps its slot until the client has read it or is dropped (SEND_TIMEOUT), so clients that
    stop reading cannot take the threads that answer everything else: a request past the slots gets its 503 from
    those. (A single answer is handed to waitress whole, and a thread waits on its reader only past 4 MB unsent, up
    to SEND_TIMEOUT.)"""
    slots = current_app.extensions["imagine.slots"]
    if not slots.acquire(blocking=False):
        raise current_engine().busy()
    return slots.release


@contextlib.contextmanager
def generation_slot():
    """A generation slot for the work inside the block (see take_generation_slot)."""
    release = take_generation_slot()
    try:
        yield
    finally:
        release()


@dataclasses.dataclass
class Answer:
    """What a dialect made of a request: the request for the engine, and how the engine's events become the
    dialect's answer: whole, as JSON, or streamed, as chunks of text."""

    request: GenerationRequest
    whole: Callable[[Job, Finished], dict]
    chunks: Callable[[Job, object], Iterable[str]] | None = None  # a stream: the text each event becomes
    error_chunk: Callable[[ImagineError], str] | None = None  # a stream: how a failure ends it
    mimetype: str = "application/x-ndjson"
    default_if_unknown: bool = False  # a model name the server lacks gets the default (OpenAI's clients send dall-e-3)
    interruptible: bool = False  # A1111's interrupt and skip may end it early: only a request of that API
    # The model the server's default becomes once the answer is done, for this run of the server (A1111's
    # override_settings_restore_afterwards false); --model stays the default after a restart.
    default_after: str | None = None


def respond(translate: Callable[[], Answer]) -> Response:
    """The answer to a generation in any dialect. In a generation slot, `translate()` reads and checks the request;
    the engine queues it; once its model is loaded and its prompts encoded (or either failed), while the status is
    still ours to set, the answer streams or comes whole. A client that leaves cancels its job (see stream_body)."""
    release = take_generation_slot()
    try:
        answer = translate()
        check_answer_spool(answer.request, current_settings())
        client_gone = request.environ.get("waitress.client_disconnected")
        engine = current_engine()
        job = current_queue().submit(
            answer.request,
            client_gone,
            default_if_unknown=answer.default_if_unknown,
            interruptible=answer.interruptible,
        )
        events = (event for event in job if not isinstance(event, (Loading, Loaded)))
        first = next(events)
        if isinstance(first, Failed):
            raise first.error
        if answer.chunks is not None:
            return Response(release_after(stream_body(job, events, answer), release), mimetype=answer.mimetype)
        response = jsonify(answer.whole(job, last_event(events)))
        if answer.default_after is not None:
            engine.catalog.default = answer.default_after
    except BaseException:
        release()
        raise
    release()
    return response


def upscaled(read: Callable[[], UpscaleRequest]) -> Upscaled:
    """An upscale in any dialect: in a generation slot, `read()` reads the request; the engine checks and queues it,
    and its pictures come back once it has run (a failure raised as its ImagineError)."""
    with generation_slot():
        job = current_engine().upscale(read(), request.environ.get("waitress.client_disconnected"))
        for event in job:
            if isinstance(event, Failed):
                raise event.error
        return event


def spool_free_bytes() -> int:
    """The free space of the folder waitress spools large answers and uploads to."""
    return shutil.disk_usage(tempfile.gettempdir()).free


def spool_shortage(needed: int) -> str | None:
    """Why the temporary folder cannot hold `needed` bytes, or None if it can."""
    free = spool_free_bytes()
    if free >= needed:
        return None
    return f"the server's temporary folder (TMPDIR) has {free >> 10} KiB free and would need {needed >> 10} KiB"


def check_answer_spool(req: GenerationRequest, settings: Settings) -> None:
    """Refuses with 507, before any work, pictures whose answer the temporary folder could not hold: past 1 MB
    waitress writes it there, and one it cannot write was cut off after the work, the client waiting for the rest."""
    side = min(1024, settings.max_size)  # where the request leaves the size to the model: the largest default
    pixels = (req.width or side) * (req.height or side)
    needed = (req.n + 1) * pixels * 4  # RGB as PNG at worst, in base64; /generate's img repeats the first picture
    if needed > OUTBUF_OVERFLOW and (why := spool_shortage(needed)):
        raise ImagineError(f"{why} for this answer; free space there, or ask for smaller or fewer pictures", 507)


def last_event(events) -> Finished | Loaded:
    """The event a job ends with (Finished; Loaded for a load job), or its Failed's error raised."""
    for event in events:
        if isinstance(event, Failed):
            raise event.error
        last = event
    return last


def stream_body(job: Job, events, answer: Answer):
    """A stream's chunks, event by event. The server closes this generator when the client leaves; the job then
    stops before its next step."""
    try:
        for event in events:
            if isinstance(event, Failed):
                yield answer.error_chunk(event.error)
            else:
                yield from answer.chunks(job, event)
    except Exception:  # the status line is sent: a failure can only be told as the stream's last chunk
        log.exception("the stream failed")
        yield answer.error_chunk(ImagineError("internal error; the server log has the details", 500))
    finally:
        job.cancel(ImagineError("the client disconnected", 499))


def release_after(chunks, release):
    """A body's chunks, then `release()`: once all are sent, or once the server gives up on the client."""
    try:
        yield from chunks
    finally:
        release()


def read_json_body() -> dict:
    """The request's JSON object; a body that is no JSON is refused saying where it stops being JSON."""
    if not request.is_json:
        raise ImagineError("send a JSON body with Content-Type: application/json", 415)
    try:
        body = parse_json(request.get_data(cache=False))
    except json.JSONDecodeError as error:
        where = f"{error.msg} at line {error.lineno}, column {error.colno}"
        raise ImagineError(f"the body is not valid JSON: {where}") from None
    except ValueError:
        raise ImagineError("the body is not valid JSON: it is not UTF-8 text") from None
    if not isinstance(body, dict):
        raise ImagineError('the body must be a JSON object, e.g. {"prompt": "a cat"}')
    return body


def parse_json(raw: bytes):
    """The parsed JSON (a ValueError where it is none); one that would cost too much to parse is refused unparsed."""
    marks = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    if marks > MAX_JSON_MARKS:
        raise ImagineError(f"the body has {marks} brackets and commas; at most {MAX_JSON_MARKS} are accepted")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ImagineError("the body's JSON is nested too deeply") from None


# ---------------------------------------------------------------------------------------------
# Imagine's own dialect: the translator
# ---------------------------------------------------------------------------------------------


def to_answer(body: dict, settings: Settings) -> Answer:
    """A /generate body as the engine's request, answered as one JSON object or, with `stream`, as NDJSON lines."""
    req = parse_request(body, settings.max_size, settings.max_batch, settings.rng)
    if not req.stream:
        return Answer(req, to_whole)
    return Answer(req, to_whole, to_lines, error_line)


def to_whole(job: Job, event: Finished) -> dict:
    images = [png_base64(image, parameters) for image, parameters in event.pictures]
    answer = {
        "img": images[0],
        "images": images,
        "seeds": event.seeds,
        "seed": event.seed,
        "model": event.model,
        "width": event.image.width,
        "height": event.image.height,
        "steps": event.steps,
        "seconds": event.seconds,
        "interrupted": event.interrupted,
    }
    # The pasted generation data's keys that set nothing (a held job's answer is built without its engine Job).
    if job is not None and job.request.parameters is not None:
        answer["parameters_ignored"] = job.request.parameters_ignored
    if event.notices:  # what the model did without (a negative prompt on FLUX, say), not an error
        answer["notices"] = event.notices
    return answer


def to_lines(job: Job, event) -> list:
    """The NDJSON lines of one event: a preview every `stream` steps, then the finished picture."""
    if isinstance(event, Preview) and due(event.step, event.steps, job.request.stream):
        step = {"step": event.step, "steps": event.steps, "index": event.index}
        seed = job.request.seed + (0 if job.request.variation_strength else event.index)  # a variation batch keeps it
        return [ndjson({"img": event.png, **step, "seed": seed, "done": False})]
    if isinstance(event, Finished):
        return [ndjson({**to_whole(job, event), "done": True})]
    return []


def error_line(error: ImagineError) -> str:
    return ndjson({"error": error.message, "done": True})


def to_error(error: ImagineError) -> dict:
    return {"error": error.message}


def ndjson(fields: dict) -> str:
    return json.dumps(fields) + "\n"


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------

ENDPOINTS = {
    "name": "Imagine, a local Stable Diffusion server",
    "endpoints": {
        "POST /generate": 'a picture: JSON in (only "prompt" is required), a base64 PNG out',
        "POST /jobs": "a generation that outlives its connection: the /generate body in, the job's id out at once",
        "GET /jobs": "the jobs the server holds (id, status, created), newest first",
        "GET /jobs/<job_id>": "where a job stands; once done, its pictures as /generate answers them",
        "GET /jobs/<job_id>/events": "a job's progress, previews (?every=N) and end as Server-Sent Events",
        "DELETE /jobs/<job_id>": "cancels a queued or running job",
        "GET /samplers": "the sampler names and schedule types /generate accepts",
        "GET /models": "the models in the models folders, with their family and whether they are loaded",
        "GET /catalog": "the models Imagine pulls by name, their variants, sizes and licences, and which are here",
        "POST /pull": 'fetches a catalog model into the models folder ({"model": "dreamshaper-8"}), its progress as '
        "NDJSON",
        "DELETE /models/<name>": "removes a pulled model's files, but those another model uses",
        "GET /health": "whether the server is up (no key needed); with the key, its device, loaded models and queue",
        "GET /loras": "the LoRAs in the loras/ sub-folders, for <lora:name:weight> in a prompt or the loras field",
        "GET /embeddings": "the textual inversions in the embeddings/ sub-folders, used by writing their name",
        "GET /upscalers": "the upscalers: None, Lanczos, Nearest and the models in upscale_models/, with scales",
        "POST /upscale": 'a picture made larger: {"img": ..., "upscaler": "4x-UltraSharp", "scale": 2}, a PNG out',
        "POST /v1/images/generations": "OpenAI's Images API: a picture from a prompt, as the openai SDK asks",
        "POST /v1/images/edits": "OpenAI's Images API: a picture edited (multipart), with a mask for inpainting",
        "GET /v1/images/files/<name>": "a picture answered as a link (response_format url), kept for an hour",
        "GET /v1/models": "OpenAI's model list: the models /v1/images/* accept",
        "POST /sdapi/v1/txt2img": "AUTOMATIC1111's txt2img, for its clients (docs/compatibility.md)",
        "POST /sdapi/v1/img2img": "AUTOMATIC1111's img2img and inpainting (init_images, mask)",
        "GET /sdapi/v1/sd-models": "the models, titled as AUTOMATIC1111 does (name.safetensors [hash])",
        "GET /sdapi/v1/options": "the current model (sd_model_checkpoint) and a few settings",
        "POST /sdapi/v1/options": "sd_model_checkpoint switches the default model, answering once it is loaded",
        "GET /sdapi/v1/progress": "the running generation's progress and latest preview",
        "POST /sdapi/v1/interrupt": "ends the running generation now with the picture as far as it got",
        "POST /sdapi/v1/skip": "ends the picture being drawn now; the batch goes on",
        "GET /sdapi/v1/samplers": "AUTOMATIC1111's sampler names that Imagine draws with",
        "GET /sdapi/v1/schedulers": "AUTOMATIC1111's schedule types",
        "GET /sdapi/v1/loras": "the LoRAs, as AUTOMATIC1111 lists them",
        "GET /sdapi/v1/embeddings": "the textual inversions, as AUTOMATIC1111 lists them",
        "GET /sdapi/v1/upscalers": "the upscalers, as AUTOMATIC1111 lists them",
        "POST /sdapi/v1/extra-single-image": "AUTOMATIC1111's Extras: one picture upscaled",
        "POST /sdapi/v1/extra-batch-images": "AUTOMATIC1111's Extras: several pictures upscaled",
        "GET /sdapi/v1/sd-vae": "empty: the models' own VAEs are used",
        "GET /sdapi/v1/sd-modules": "empty: Forge's extra text encoders and VAEs, which SillyTavern asks for",
        "GET /sdapi/v1/latent-upscale-modes": "the hires fix's latent upscalers",
        "GET /sdapi/v1/face-restorers": "empty",
        "GET /sdapi/v1/prompt-styles": "empty",
        "GET /sdapi/v1/hypernetworks": "empty",
        "GET /sdapi/v1/scripts": "none",
        "GET /sdapi/v1/cmd-flags": "the few server flags a client may know",
        "POST /sdapi/v1/png-info": "the generation parameters stored in a PNG",
        "GET /": "the web page for a browser (Accept: text/html), this list for anything else",
        "GET /web/<name>": "the web page's script and style",
    },
    "readme": "README.md beside imagine.py, and docs/: every field, setting and example",
}


@blueprint.post("/generate")
def generate_route():
    return respond(lambda: to_answer(read_json_body(), current_settings()))


@blueprint.get("/samplers")
def samplers_route():
    """The sampler names, the schedule types (A1111's, "automatic" the sampler's own), and which sampler takes which;
    with `?model=NAME`, those that model draws with (the flow-matching families have samplers of their own)."""
    name = request.args.get("model")
    if name is None:
        return jsonify(
            samplers=list(SAMPLER_NAMES),
            default=DEFAULT_SAMPLER,
            schedules=[{"name": name, "label": LABELS[name]} for name in SCHEDULE_NAMES],
            schedules_by_sampler={sampler: list(schedules_for(sampler)) for sampler in SAMPLER_NAMES},
        )
    engine = current_engine()
    try:
        family = engine.catalog.checked_family(engine.catalog.resolve(name))
    except ImagineError as error:
        return jsonify(to_error(error)), error.status
    return jsonify(model_samplers(family))


def model_samplers(family) -> dict:
    """GET /samplers?model=: the samplers and schedules a model of `family` draws with, and what a request that gives
    no steps, guidance or sampler gets (the flow-matching families' differ from SD's)."""
    samplers = family.samplers or SAMPLER_NAMES
    defaults = {"num_steps": family.default_steps, "guidance": family.default_guidance, "size": family.default_size}
    by_sampler = {sampler: list(schedules_for(sampler)) if not family.flow else ["automatic"] for sampler in samplers}
    schedules = [name for name in SCHEDULE_NAMES if any(name in allowed for allowed in by_sampler.values())]
    return {
        "samplers": list(samplers),
        "default": family.default_sampler,
        "schedules": [{"name": name, "label": LABELS[name]} for name in schedules],
        "schedules_by_sampler": by_sampler,
        "family": family.name,
        "defaults": defaults,
    }


@blueprint.get("/")
def index_route():
    """What someone who opens the server's address finds: the web page in a browser; for an API client,
    what the server answers and where it is explained."""
    response = jsonify(ENDPOINTS) if current_settings().no_web or not wants_html() else send_web_file("index.html")
    response.vary.add("Accept")  # one address, two answers: caches must keep them apart
    return response


@blueprint.get("/web/<name>")
def web_file_route(name):
    if current_settings().no_web or name not in WEB_FILES:
        raise ImagineError(f"no such file: {name!r}", 404)
    return send_web_file(name)


def wants_html() -> bool:
    """A browser asks for text/html first; curl (*/*) and API clients (application/json) get the JSON."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def send_web_file(name: str) -> Response:
    return send_from_directory(WEB_DIR, name, max_age=0)


@blueprint.get("/models")
def models_route():
    catalog = current_engine().catalog
    return jsonify(models=catalog.listing(), default=catalog.default)


@blueprint.get("/health")
def health_route():
    # For load balancers: it reads a few fields and never waits for the engine, so it answers mid-generation.
    # It needs no key (a load balancer's check sends none); without the key it tells only that the server is up.
    engine = current_engine()
    if engine.settings.api_key and not has_key(engine.settings):
        return jsonify(status="ok")
    loaded = [model.name for model in list(engine.models.loaded.values())]
    running = engine.running is not None
    answer = {"status": "ok", "device": str(engine.device), "loaded": loaded, "queue": engine.jobs.qsize()}
    answer["running"] = running
    if (fleet := current_app.extensions.get("imagine.fleet")) is not None:
        answer["fleet"] = fleet.health()  # the shared queue; the fields above are this server's own
    return jsonify(answer)


@blueprint.get("/loras")
def loras_route():
    settings = current_settings()
    return jsonify(loras=current_engine().catalog.reader.read(lambda: lora_listing(settings)))


@blueprint.get("/embeddings")
def embeddings_route():
    settings = current_settings()
    return jsonify(embeddings=current_engine().catalog.reader.read(lambda: embedding_listing(settings)))


@blueprint.get("/upscalers")
def upscalers_route():
    engine = current_engine()
    return jsonify(upscalers=[upscaler_entry(each) for each in engine.catalog.reader.read(engine.upscalers.listing)])


def upscaler_entry(upscaler) -> dict:
    """An upscaler as GET /upscalers lists it: a model's file below the models folder, and why it cannot be used."""
    entry = {"name": upscaler.name, "scale": upscaler.scale, "architecture": upscaler.architecture}
    return {**entry, "file": upscaler.relative, "error": upscaler.error}


@blueprint.post("/upscale")
def upscale_route():
    event = upscaled(lambda: parse_upscale_request(read_json_body()))
    image = event.images[0]
    return jsonify(img=png_base64(image), width=image.width, height=image.height, seconds=event.seconds)
