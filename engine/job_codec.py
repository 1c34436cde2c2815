"""A job as data that outlives the process holding it: a GenerationRequest and the engine's events (engine/job.py) to
JSON-able dicts and back, for the job ledger (engine/job_ledger.py) and for other servers of a fleet. Pictures travel
as PNG, lossless: inline as base64, or, where a folder is given, as files in it that the data names (a ledger keeps
them beside its database, not in it). Decoding checks the data's shape and raises ValueError on any other."""

import base64
import dataclasses
import io
from pathlib import Path

from PIL import Image

from engine.errors import ImagineError
from engine.files.families import FAMILIES
from engine.job import Failed, Finished, Loaded, Loading, Preview, Progress, Started
from engine.previews import png_bytes
from engine.request import GenerationRequest

VERSION = 1  # of the data's shape: data of another version is refused, not misread
PICTURE_FIELDS = ("img", "mask")  # the request's fields that hold pictures
REQUEST_FIELDS = tuple(field.name for field in dataclasses.fields(GenerationRequest))
SIGNALS = {"loading": Loading, "loaded": Loaded, "started": Started}  # the events that carry nothing


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def picture_data(image: Image.Image, name: str, folder: Path | None = None, parameters: str | None = None) -> dict:
    """A picture as {"png": base64}, or, with `folder`, written there as `name`.png and named {"file": ...}; with
    `parameters`, its PNG carries them as a drawn picture's does."""
    data = png_bytes(image, parameters)
    if folder is None:
        return {"png": base64.b64encode(data).decode("ascii")}
    file_name = f"{name}.png"
    (folder / file_name).write_bytes(data)
    return {"file": file_name}


def picture_from_data(data: dict, folder: Path | None = None) -> Image.Image:
    """The picture that picture_data wrote, in its mode (RGB, RGBA or L), read whole."""
    if not isinstance(data, dict):
        raise ValueError(f"a picture is {{'png': ...}} or {{'file': ...}}, not {type(data).__name__}")
    if "png" in data:
        source = io.BytesIO(base64.b64decode(data["png"], validate=True))
    elif "file" in data and folder is not None and Path(data["file"]).name == data["file"]:
        source = folder / data["file"]  # a bare name: the data cannot point outside its folder
    else:
        raise ValueError(f"a picture is {{'png': ...}}, or {{'file': NAME}} with a folder, not {sorted(data)}")
    with Image.open(source) as image:
        image.load()
        return image


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def request_data(req: GenerationRequest, folder: Path | None = None) -> dict:
    """The request as JSON-able data: every field, its pictures as picture_data (files in `folder`, where given)."""
    data = {"version": VERSION}
    for field in REQUEST_FIELDS:
        value = getattr(req, field)
        if field in PICTURE_FIELDS:
            value = None if value is None else picture_data(value, field, folder)
        elif field == "loras":
            value = [[name, weight] for name, weight in value]
        data[field] = value
    return data


def request_from_data(data: dict, folder: Path | None = None) -> GenerationRequest:
    """The request that request_data wrote; it draws the same pictures."""
    check_version(data)
    fields = {key: value for key, value in data.items() if key != "version"}
    unknown = set(fields).difference(REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"a request has no fields {sorted(unknown)}")
    for field in PICTURE_FIELDS:
        if fields.get(field) is not None:
            fields[field] = picture_from_data(fields[field], folder)
    fields["loras"] = [(name, weight) for name, weight in fields.get("loras", [])]
    return GenerationRequest(**fields)


def check_version(data: dict) -> None:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        shown = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"job data of version {VERSION} expected, not {shown!r}")


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def error_data(error: ImagineError) -> dict:
    # The template keeps the fields the message names marked, so that each dialect still names them its own way.
    return {"message": error.template, "status": error.status, "retry_after": error.retry_after, "field": error.field}


def error_from_data(data: dict) -> ImagineError:
    return ImagineError(data["message"], data["status"], data.get("retry_after"), data.get("field"))


def event_data(event, folder: Path | None = None) -> dict:
    """A generation's event (Loading, Loaded, Started, Progress, Preview, Finished or Failed) as JSON-able data;
    a Finished event's pictures as files in `folder`, where given (picture-0.png, ...), each carrying its settings."""
    if isinstance(event, Progress):
        return {"event": "progress", "step": event.step, "steps": event.steps}
    if isinstance(event, Preview):
        fields = {"step": event.step, "steps": event.steps, "index": event.index}
        return {"event": "preview", **fields, "image": {"png": event.png}}  # its PNG as readers already have it
    if isinstance(event, Finished):
        return {"event": "finished", **finished_fields(event, folder)}
    if isinstance(event, Failed):
        return {"event": "failed", "error": error_data(event.error), "cancelled": event.cancelled}
    for name, kind in SIGNALS.items():
        if isinstance(event, kind):
            return {"event": name}
    raise ValueError(f"no data for an event of type {type(event).__name__}")


def finished_fields(event: Finished, folder: Path | None) -> dict:
    pictures = [
        {"image": picture_data(image, f"picture-{index}", folder, parameters), "parameters": parameters}
        for index, (image, parameters) in enumerate(event.pictures)
    ]
    return {
        "pictures": pictures,
        "seed": event.seed,
        "seeds": event.seeds,
        "model": event.model,
        "family": event.family.name,
        "steps": event.steps,
        "seconds": event.seconds,
        "interrupted": event.interrupted,
        "notices": event.notices,
    }


def event_from_data(data: dict, folder: Path | None = None):
    """The event that event_data wrote."""
    kind = data.get("event") if isinstance(data, dict) else None
    if kind in SIGNALS:
        return SIGNALS[kind]()
    if kind == "progress":
        return Progress(data["step"], data["steps"])
    if kind == "preview":
        return Preview(data["step"], data["steps"], picture_from_data(data["image"]), data["index"])
    if kind == "finished":
        return finished_from_data(data, folder)
    if kind == "failed":
        return Failed(error_from_data(data["error"]), data["cancelled"])
    raise ValueError(f"no event {kind!r}")


def finished_from_data(data: dict, folder: Path | None) -> Finished:
    pictures = [(picture_from_data(each["image"], folder), each["parameters"]) for each in data["pictures"]]
    if not pictures:
        raise ValueError("a finished event holds at least one picture")
    if data["family"] not in FAMILIES:
        raise ValueError(f"no model family {data['family']!r}")
    image, parameters = pictures[0]
    return Finished(
        image,
        parameters,
        data["seed"],
        data["model"],
        FAMILIES[data["family"]],
        data["steps"],
        data["seconds"],
        pictures,
        data["seeds"],
        data["interrupted"],
        data["notices"],
    )
