"""OpenAI's Images API (/v1/images/generations, /v1/images/edits, /v1/models) for the openai SDK, Open WebUI and
LibreChat: a translator only. Its bodies become /generate bodies for parse_request, and the engine's events
become OpenAI's answers, through native.respond."""

import base64
import collections
import dataclasses
import io
import json
import logging
import re
import secrets
import threading
import time

from flask import Blueprint, Response, current_app, jsonify, request
from PIL import Image

from api.native import Answer, current_engine, current_settings, parse_json, read_json_body, respond
from engine.errors import ImagineError
from engine.fields import decode_image, integer, rounded_size, text
from engine.fields import size as size_field
from engine.job import Finished, Job, Preview
from engine.previews import png_bytes
from engine.request import parse_request
from engine.settings import DEMO_MODEL

log = logging.getLogger("imagine")


# OpenAI's quality names as steps: low is a quick draft, high takes about twice the default's time.
# Steps by quality; None: the model family's own (25 for SD, 8 for Z-Image-Turbo, 4 for FLUX.2 klein, ...).
OPENAI_QUALITY_STEPS = {"low": 12, "medium": None, "standard": None, "auto": None, "high": 40, "hd": 40}


OPENAI_OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


OPENAI_RESPONSE_FORMATS = ("b64_json", "url")


MAX_PARTIAL_IMAGES = 3  # OpenAI's limit


# Imagine's own knobs, sent as extra fields (the SDK's extra_body), and their /generate names.
OPENAI_KNOBS = {
    "negative_prompt": "neg",
    "seed": "seed",
    "steps": "num_steps",
    "guidance": "guidance",
    "sampler": "sampler",
    "schedule": "schedule",
    "rng": "rng",
    "loras": "loras",
    "clip_skip": "clip_skip",
    "strength": "strength",
}


# OpenAI's fields with no meaning here: accepted, so that clients which always send them work.
OPENAI_IGNORED = ("moderation", "style", "user", "input_fidelity")


OPENAI_FIELDS = {
    "prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
    "background", "stream", "partial_images", *OPENAI_IGNORED, *OPENAI_KNOBS,
}  # fmt: skip


# Multipart parts are text: these are read as the numbers and booleans the JSON route gets.
OPENAI_FORM_INTEGERS = ("n", "output_compression", "partial_images", "seed", "steps", "clip_skip")


OPENAI_FORM_NUMBERS = ("guidance", "strength")


# OpenAI bills by tokens; the SDK's types want the fields, and nothing is billed here.
OPENAI_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


LINKED_PICTURES_KEPT = 64  # pictures answered as links, the newest kept: a few hundred MB at most


LINKED_PICTURE_SECONDS = 3600


@dataclasses.dataclass
class OpenAIOptions:
    """What an OpenAI request asks of the answer rather than of the picture."""

    size: str = "auto"
    quality: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    stream: bool = False
    partial_images: int = 0


def openai_size(size: str, max_size: int) -> dict:
    """`auto` (the family's default, or the input picture's size) or `WxH`, as /generate's width and height, each
    rounded down to a multiple of 8 as AUTOMATIC1111 does (the answer's `size` is the size drawn)."""
    if size == "auto":
        return {}
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if match is None:
        raise ImagineError(f"size must be 'auto' or WIDTHxHEIGHT such as '512x512', not {size!r}")
    dimensions = {"width": rounded_size(int(match[1])), "height": rounded_size(int(match[2]))}
    try:
        for field in dimensions:
            size_field(dimensions, field, None, max_size)
    except ImagineError as error:
        raise ImagineError(f"size {size!r}: {error.message}") from None
    return dimensions


def openai_options(body: dict) -> OpenAIOptions:
    options = OpenAIOptions(
        size=text(body, "size", "auto"),
        quality=text(body, "quality", "auto"),
        response_format=text(body, "response_format", "b64_json"),
        output_format=text(body, "output_format", "png"),
        output_compression=integer(body, "output_compression", 100, 0, 100),
        partial_images=integer(body, "partial_images", 0, 0, MAX_PARTIAL_IMAGES),
    )
    if options.quality not in OPENAI_QUALITY_STEPS:
        raise ImagineError(f"quality must be one of: {', '.join(OPENAI_QUALITY_STEPS)}, not {options.quality!r}")
    if options.response_format not in OPENAI_RESPONSE_FORMATS:
        raise ImagineError(f"response_format must be 'b64_json' or 'url', not {options.response_format!r}")
    if options.output_format not in OPENAI_OUTPUT_FORMATS:
        raise ImagineError(f"output_format must be one of: png, jpeg, webp, not {options.output_format!r}")
    background = body.get("background")
    if background == "transparent":
        raise ImagineError("background 'transparent' is not supported: Stable Diffusion draws opaque pictures")
    if background not in (None, "auto", "opaque"):
        raise ImagineError(f"background must be 'auto' or 'opaque', not {json.dumps(background)[:80]}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ImagineError(f"stream must be true or false, not {json.dumps(stream)[:80]}")
    options.stream = stream
    return options


def openai_generate_body(body: dict, max_size: int) -> tuple:
    """An OpenAI request's /generate body (for parse_request, which checks it) and its answer options."""
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        raise ImagineError(f"unknown parameter {unknown[0]!r}; the parameters are: {', '.join(sorted(OPENAI_FIELDS))}")
    options = openai_options(body)
    generate_body = {OPENAI_KNOBS[knob]: body[knob] for knob in OPENAI_KNOBS if knob in body}
    generate_body.setdefault("num_steps", OPENAI_QUALITY_STEPS[options.quality])
    generate_body.update(openai_size(options.size, max_size), prompt=body.get("prompt"))
    if "n" in body:
        generate_body["n"] = body["n"]
    if options.stream and options.partial_images:
        generate_body["stream"] = 1  # a fast preview after every step; the partial images are picked from them
    return generate_body, options


def form_fields(form) -> dict:
    """A multipart form as the JSON body it stands for: numbers and booleans from their text, `loras` from
    JSON text or from the SDK's flattened `loras[][name]` / `loras[][weight]` parts. Text that is no number
    stays text, for parse_request to name."""
    body, loras = {}, []
    for key, value in form.items(multi=True):
        if key == "loras[][name]":
            loras.append({"name": value})
        elif key == "loras[][weight]" and loras:
            loras[-1]["weight"] = float(value) if re.fullmatch(r"-?\d+(\.\d+)?", value) else value
        elif key in OPENAI_FORM_INTEGERS and re.fullmatch(r"-?\d{1,20}", value):
            body[key] = int(value)
        elif key in OPENAI_FORM_NUMBERS and re.fullmatch(r"-?\d{1,20}(\.\d{1,20})?", value):
            body[key] = float(value)
        elif key == "stream" and value in ("true", "false"):
            body[key] = value == "true"
        elif key == "loras":  # JSON text; text that is no JSON stays, for lora_field to refuse
            try:
                body[key] = parse_json(value.encode())
            except ValueError:
                body[key] = value
        else:
            body[key] = value
    if loras:
        body["loras"] = loras
    return body


def openai_mask(data: bytes, field: str = "mask") -> Image.Image:
    """OpenAI's mask (transparent pixels are repainted) as /generate's (white repaints)."""
    image = decode_image(base64.b64encode(data).decode("ascii"), field, "RGBA")
    repaint = image.getchannel("A").point(lambda alpha: 255 - alpha)
    if repaint.getbbox() is None:
        raise ImagineError("mask has no transparent pixels: they mark the part of the image to repaint")
    return repaint


def encode_picture(image: Image.Image, parameters: str | None, options: OpenAIOptions) -> bytes:
    """The picture in the asked format; a PNG keeps its settings, as /generate's do."""
    if options.output_format == "png":
        return png_bytes(image, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format=OPENAI_OUTPUT_FORMATS[options.output_format], quality=options.output_compression)
    return buffer.getvalue()


class LinkedPictures:
    """Pictures answered as links: in memory for `seconds` (an hour), the newest LINKED_PICTURES_KEPT, under names
    nobody can guess (the links are the only way to them)."""

    def __init__(self, seconds: float = LINKED_PICTURE_SECONDS):
        self.seconds = seconds
        self.pictures = collections.OrderedDict()  # name -> (expiry, data)
        self.lock = threading.Lock()

    def add(self, data: bytes, extension: str) -> str:
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        now = time.monotonic()
        with self.lock:
            # The oldest come first (all live the same time): the expired ones go, and beyond the bound the oldest.
            while self.pictures and (len(self.pictures) >= LINKED_PICTURES_KEPT or self.oldest_expiry() < now):
                self.pictures.popitem(last=False)
            self.pictures[name] = (now + self.seconds, data)
        return name

    def oldest_expiry(self) -> float:
        return next(iter(self.pictures.values()))[0]

    def get(self, name: str) -> bytes | None:
        with self.lock:
            expiry, data = self.pictures.get(name, (0, None))
            if expiry < time.monotonic():
                self.pictures.pop(name, None)
                return None
            return data


def openai_answer_fields(options: OpenAIOptions, width: int, height: int) -> dict:
    return {
        "size": f"{width}x{height}",
        "quality": options.quality,
        "background": "opaque",
        "output_format": options.output_format,
    }


# ---------------------------------------------------------------------------------------------
# The translator: body in, request out; events in, answer out
# ---------------------------------------------------------------------------------------------


def to_answer(body: dict, settings, kind: str, picture: dict, link) -> Answer:
    """An OpenAI request as the engine's request and the way to answer it. `picture` holds an edit's decoded
    img and mask (empty for a generation); `link(data, extension)` keeps a picture answered as a URL and gives it."""
    generate_body, options = openai_generate_body(body, settings.max_size)
    generate_body.update(picture, model=body.get("model"))
    req = parse_request(generate_body, settings.max_size, settings.max_batch, settings.rng)

    def whole(job: Job, event: Finished) -> dict:
        return to_images(event, options, link)

    if not options.stream:
        return Answer(req, whole, default_if_unknown=True)
    return Answer(req, whole, PartialImages(options, kind).chunks, error_event, "text/event-stream", True)


def to_images(event: Finished, options: OpenAIOptions, link) -> dict:
    data = []
    for image, parameters in event.pictures:
        picture = encode_picture(image, parameters, options)
        if options.response_format == "url":
            data.append({"url": link(picture, options.output_format), "revised_prompt": None})
        else:
            data.append({"b64_json": base64.b64encode(picture).decode("ascii"), "revised_prompt": None})
    fields = openai_answer_fields(options, event.image.width, event.image.height)
    return {"created": int(time.time()), "data": data, **fields, "usage": OPENAI_USAGE}


class PartialImages:
    """A stream's events: up to `partial_images` previews per picture, spread evenly over its steps, then a
    completed event for each picture."""

    def __init__(self, options: OpenAIOptions, kind: str):
        self.options, self.kind = options, kind
        self.shown = collections.Counter()  # partial images sent, per picture of the batch

    def due(self, event: Preview) -> bool:
        shown, wanted = self.shown[event.index], self.options.partial_images
        return shown < wanted and event.step * (wanted + 1) >= (shown + 1) * event.steps

    def completed(self, image: Image.Image, parameters: str, created: int, fields: dict) -> str:
        data = base64.b64encode(encode_picture(image, parameters, self.options)).decode("ascii")
        kind = f"{self.kind}.completed"
        return server_event(kind, b64_json=data, created_at=created, usage=OPENAI_USAGE, **fields)

    def chunks(self, job: Job, event) -> list:
        options, created = self.options, int(time.time())
        fields = openai_answer_fields(options, job.request.width, job.request.height)
        # The k-th of p partial images comes at k/(p+1) of the steps.
        if isinstance(event, Preview) and self.due(event):
            data = base64.b64encode(encode_picture(event.image, None, options)).decode("ascii")
            index = self.shown[event.index]
            self.shown[event.index] += 1
            event_kind = f"{self.kind}.partial_image"
            return [server_event(event_kind, b64_json=data, partial_image_index=index, created_at=created, **fields)]
        if isinstance(event, Finished):
            return [self.completed(image, parameters, created, fields) for image, parameters in event.pictures]
        return []


# /generate's field -> the OpenAI parameter it came from, so that an error names what the client sent.
OPENAI_FIELD_NAMES = {field: knob for knob, field in OPENAI_KNOBS.items()} | {"img": "image"}


def to_error(error: ImagineError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.text(OPENAI_FIELD_NAMES), "type": kind, "param": None, "code": None}}


def error_event(error: ImagineError) -> str:
    return server_event("error", **to_error(error))


def server_event(kind: str, **fields) -> str:
    """One server-sent event; the SDK reads the type from the data, which is always JSON."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------

blueprint = Blueprint("openai", __name__, url_prefix="/v1")


@blueprint.record_once
def keep_linked_pictures(state):
    state.app.extensions["imagine.linked"] = LinkedPictures()


def linker():
    """The `link` of this request's answer: it keeps a picture and gives its URL on the host the client called."""
    pictures, host_url = current_app.extensions["imagine.linked"], request.host_url

    def link(data: bytes, extension: str) -> str:
        return f"{host_url}v1/images/files/{pictures.add(data, extension)}"

    return link


@blueprint.post("/images/generations")
def generations_route():
    return respond(lambda: to_answer(read_json_body(), current_settings(), "image_generation", {}, linker()))


@blueprint.post("/images/edits")
def edits_route():
    return respond(edit_answer)


def edit_answer() -> Answer:
    if request.mimetype != "multipart/form-data":
        raise ImagineError("send the edit as multipart/form-data, as the openai SDK does", 415)
    images = request.files.getlist("image") + request.files.getlist("image[]")
    if len(images) != 1:
        raise ImagineError(f"send one image; Imagine edits one picture at a time, not {len(images)}")
    picture = {"img": decode_image(base64.b64encode(images[0].read()).decode("ascii"), "image")}
    if "mask" in request.files:
        picture["mask"] = openai_mask(request.files["mask"].read())
    return to_answer(form_fields(request.form), current_settings(), "image_edit", picture, linker())


@blueprint.get("/images/files/<name>")
def file_route(name):
    data = current_app.extensions["imagine.linked"].get(name)
    if data is None:
        raise ImagineError(f"no picture {name!r}: links last an hour, for the newest {LINKED_PICTURES_KEPT}", 404)
    return Response(data, mimetype=f"image/{name.rpartition('.')[2]}")


@blueprint.get("/models")
def models_route():
    catalog = current_engine().catalog
    names = dict.fromkeys([catalog.default, *(model["name"] for model in catalog.listing()), DEMO_MODEL])
    listed = [{"id": name, "object": "model", "created": 0, "owned_by": "imagine"} for name in names]
    return jsonify(object="list", data=listed)
