"""Models by name, in Imagine's own dialect: GET /catalog (what can be pulled, and what is here), POST /pull (a
catalog model fetched into the models folder, its progress as NDJSON lines, as Ollama's /api/pull streamed them) and
DELETE /models/<name> (a pulled model's files removed, but those another model uses). The work is engine/pull.py's."""

import json
import logging
import threading

from flask import Blueprint, Response, current_app, jsonify

from api.guard import has_one_owner
from api.native import current_engine, current_settings, last_event, ndjson, read_json_body
from api.native import to_error as native_error
from engine.devices import device_memory
from engine.errors import ImagineError
from engine.fields import text
from engine.files.folders import find_in_folders, model_folders
from engine.files.library import Library
from engine.logs import escaped
from engine.pull import Puller
from engine.request import MAX_NAME_CHARS

log = logging.getLogger("imagine")

PULL_SLOTS = 2  # pulls at once: each holds a server thread for as long as it fetches (see create_server)

blueprint = Blueprint("pulls", __name__)


@blueprint.record_once
def keep_puller(state):
    state.app.extensions["imagine.puller"] = Puller(state.app.extensions["imagine.engine"].settings, Library())
    state.app.extensions["imagine.pull_slots"] = threading.BoundedSemaphore(PULL_SLOTS)


def to_error(error: ImagineError) -> dict:
    return native_error(error)


def current_puller() -> Puller:
    return current_app.extensions["imagine.puller"]


def check_may_pull() -> None:
    """Pulling writes gigabytes: off with --no-pull, and a server others can reach lets only key holders pull (the
    guard has checked the key where one is set)."""
    settings = current_settings()
    if settings.no_pull:
        raise ImagineError("pulling and removing models is switched off on this server (--no-pull)", 403)
    if not has_one_owner(settings):
        message = "this server is open to other machines without an API key: set one (IMAGINE_API_KEY) to pull"
        raise ImagineError(message, 403)


# ---------------------------------------------------------------------------------------------
# The catalog, as JSON
# ---------------------------------------------------------------------------------------------


def catalog_fields(library: Library, folders: list, memory: int) -> list:
    """GET /catalog's models: each variant of each catalog model, whether its files are here, and which variant the
    bare name takes on this machine and why."""
    listed = []
    for entry in library.entries.values():
        taken, why = library.variant(entry.name, memory)
        for variant in entry.variants.values():
            files = [{"repo": file.repo, "path": file.path, "folder": file.folder, "size": file.size}
                     for file in variant.files]  # fmt: skip
            listed.append(
                {
                    "name": variant.label,
                    "family": entry.family,
                    "description": entry.description,
                    "license": entry.license,
                    "size": variant.size,
                    "present": all(find_in_folders(folders, file.destination) for file in variant.files),
                    "files": files,
                    **({"taken": why} if variant is taken else {}),
                }
            )
    return listed


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------


@blueprint.get("/catalog")
def catalog_route():
    engine = current_engine()
    folders = model_folders(engine.settings.models_dir)
    library, here = current_puller().library, memory()
    models = engine.catalog.reader.read(lambda: catalog_fields(library, folders, here))
    return jsonify(models=models)


def memory() -> int:
    return device_memory(current_engine().device)


@blueprint.post("/pull")
def pull_route():
    check_may_pull()
    body = read_json_body()
    name = text(body, "model", None, MAX_NAME_CHARS)
    if name is None:
        raise ImagineError('model is required: a catalog name such as "dreamshaper-8" (GET /catalog)', field="model")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise ImagineError(f"stream must be true or false, not {json.dumps(stream)[:80]}", field="stream")
    slots = current_app.extensions["imagine.pull_slots"]
    if not slots.acquire(blocking=False):
        raise ImagineError(f"{PULL_SLOTS} pulls are running; try again when one ends", 503, retry_after=30)
    try:
        lines = current_puller().pull(name, memory())
        first = next(lines)  # the hub asked and the space checked: a refusal still gets its own status
    except BaseException:
        slots.release()
        raise
    log.info("pulling %s: %s", escaped(name), escaped(first["reason"]))
    if not stream:
        try:
            last = [first, *lines][-1]
        finally:
            slots.release()
        return jsonify(last)
    return Response(pull_body(first, lines, slots.release), mimetype="application/x-ndjson")


def pull_body(first: dict, lines, release):
    """The pull's lines as NDJSON; a failure once they flow is the last line. The pull stops where its client leaves
    (the server closes this generator), keeping what came for the next pull."""
    try:
        yield ndjson(first)
        for line in lines:
            yield ndjson(line)
    except ImagineError as error:
        yield ndjson({"error": error.message})
    except Exception:  # the status line is sent: a failure can only be told as the last line
        log.exception("the pull failed")
        yield ndjson({"error": "internal error; the server log has the details"})
    finally:
        lines.close()
        release()


@blueprint.delete("/models/<name>")
def remove_route(name):
    check_may_pull()
    engine = current_engine()
    key = engine.catalog.pulled_model(name)
    if key is not None:
        last_event(engine.unload_model(str(key)))
    used = engine.catalog.reader.read(lambda: engine.catalog.files_in_use(but=key))
    removed = current_puller().remove(name, used)
    log.info("removed %s: %s", escaped(name), escaped(removed))
    return jsonify(model=name, **removed)
