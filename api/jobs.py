"""Jobs in Imagine's own dialect: POST /jobs takes a /generate body and answers at once with the job's id; the job is
then polled (GET /jobs/<id>), followed as Server-Sent Events that a client picks up where it left them
(GET /jobs/<id>/events with Last-Event-ID), or cancelled (DELETE); a client that leaves does not cancel it."""

import dataclasses
import json

from flask import Blueprint, Response, current_app, jsonify, request

from api.guard import has_one_owner
from api.native import current_settings, generation_slot, read_json_body, to_answer
from api.native import to_error as native_error
from api.native import to_whole as native_whole
from engine.errors import ImagineError
from engine.fields import whole_number
from engine.held_jobs import ENDED, HeldJob, JobStore
from engine.job import due
from engine.request import MAX_STEPS

blueprint = Blueprint("jobs", __name__)

# Event streams one job may have open at once: a page and a CLI watching it, and one to spare. One client cannot take
# the server's stream threads with streams of its own job; a client refused polls GET /jobs/<id> instead.
STREAMS_PER_JOB = 3
KEEPALIVE_SECONDS = 15  # a comment line on a quiet stream: proxies keep it open, and a client that left is seen
WAIT_SLICE = 1.0  # seconds a stream waits for a new event before it looks whether its client is still there
RETRY_MS = 1000  # how soon a browser's EventSource reconnects after the stream broke


def to_error(error: ImagineError) -> dict:
    return native_error(error)


def current_jobs() -> JobStore:
    return current_app.extensions["imagine.jobs"]


def stream_slots(app):
    """One slot for each open event stream: each holds a server thread while it waits (see create_server)."""
    return app.extensions["imagine.streams"]


# ---------------------------------------------------------------------------------------------
# The job as JSON
# ---------------------------------------------------------------------------------------------


def job_fields(store: JobStore, held: HeldJob, with_preview: bool = False) -> dict:
    """GET /jobs/<id>: where the job stands and, once done, the fields of a /generate answer."""
    status = held.status
    fields = {"id": held.id, "status": status}
    if status == "queued":
        fields["position"] = store.position(held)
    fields |= {
        "prompt": held.prompt,
        "step": held.step,
        "steps": held.steps,
        "created": held.created,
        "started": held.started,
        "finished": held.finished,
    }
    if held.error is not None:
        fields["error"] = held.error
    fields |= drawn_by(held)
    if status == "done":
        fields |= held.result_fields(lambda finished: native_whole(None, finished))  # to_whole reads only the event
    if with_preview:
        fields["preview"] = held.preview()
    return fields


def drawn_by(held) -> dict:
    """In a fleet (--queue), the server that drew the job and how many times it was drawn (again where a server
    died drawing it); nothing on a lone server, or before it is drawn."""
    return {} if held.server is None else {"server": held.server, "attempts": held.attempts}


def switch(name: str) -> bool:
    value = request.args.get(name, "0").lower()
    if value not in ("0", "1", "true", "false"):
        raise ImagineError(f"{name} must be 1 or 0, not {value[:40]!r}", field=name)
    return value in ("1", "true")


# ---------------------------------------------------------------------------------------------
# Server-Sent Events
# ---------------------------------------------------------------------------------------------


def sse(record_id: int, kind: str, fields: dict) -> str:
    return f"id: {record_id}\nevent: {kind}\ndata: {json.dumps(fields)}\n\n"


def record_event(store: JobStore, held: HeldJob, record) -> str:
    if record.kind == "progress":
        return sse(record.id, "progress", {"step": record.step, "steps": record.steps})
    if record.kind == "preview":
        return sse(record.id, "preview", {"step": record.step, "steps": record.steps, "img": record.preview.png})
    return sse(record.id, record.kind, job_fields(store, held))  # the end: the job as GET /jobs/<id> shows it


def event_stream(store: JobStore, held: HeldJob, last_id: int, every: int | None, client_gone):
    """The job's events after `last_id`, then its live ones until it ends. With `every`, the engine previews the
    job's first picture every `every` steps while the stream is open, and the stream sends those previews."""
    yield f"retry: {RETRY_MS}\n\n"
    watched = held.watch(every)
    try:
        yield from records_as_events(store, held, last_id, every or 0, client_gone)
    finally:
        if watched is not None:
            watched.watch(every, watching=False)


def records_as_events(store: JobStore, held: HeldJob, last_id: int, every: int, client_gone):
    quiet = 0.0
    while True:
        records = held.records_after(last_id, WAIT_SLICE)
        for record in records:
            last_id = record.id
            if record.kind == "preview" and not due(record.step, record.steps, every):
                continue  # one another stream or a poll asked for
            yield record_event(store, held, record)
            if record.kind in ENDED:
                return
        quiet = 0.0 if records else quiet + WAIT_SLICE
        if client_gone is not None and client_gone():
            return
        if quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            yield ": keepalive\n\n"


def last_event_id(held: HeldJob) -> int:
    """The Last-Event-ID a reconnecting client sends (0 without one): an id this job's stream can have sent."""
    text = request.headers.get("Last-Event-ID")
    if text is None or not text.strip():
        return 0
    last_id = whole_number("Last-Event-ID", text, 0, 10**9)
    if last_id > held.last_id:
        raise ImagineError(f"Last-Event-ID {last_id} is past job {held.id}'s last event ({held.last_id})", 400)
    return last_id


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------


@blueprint.post("/jobs")
def submit_route():
    with generation_slot():
        req = to_answer(read_json_body(), current_settings()).request
        # A job's previews are those its event streams (?every=N) and polls ask for while it runs.
        held = current_jobs().submit(dataclasses.replace(req, stream=0))
    url = f"/jobs/{held.id}"
    response = jsonify({**job_fields(current_jobs(), held), "url": url, "events": f"{url}/events"})
    response.headers["Location"] = url
    return response, 202


@blueprint.get("/jobs")
def list_route():
    # A job's id is what lets a client read its pictures and cancel it: the list of ids is for the server's owner only.
    if not has_one_owner(current_settings()):
        message = "this server is open to other machines without an API key: it lists no jobs (set IMAGINE_API_KEY)"
        raise ImagineError(message, 403)
    store = current_jobs()
    jobs = [
        {"id": held.id, "status": held.status, "created": held.created} | drawn_by(held) for held in store.listing()
    ]
    return jsonify(jobs=jobs)


@blueprint.get("/jobs/<job_id>")
def job_route(job_id):
    store = current_jobs()
    return jsonify(job_fields(store, store.get(job_id), with_preview=switch("preview")))


@blueprint.get("/jobs/<job_id>/events")
def events_route(job_id):
    store = current_jobs()
    held = store.get(job_id)
    every = request.args.get("every")
    every = None if every is None else whole_number("every", every, 1, MAX_STEPS)
    last_id = last_event_id(held)
    if held.status in ENDED and last_id >= held.last_id:
        return Response(status=204)  # it has seen the end: a 204 tells EventSource to stop reconnecting
    release = take_stream_slot(held)
    client_gone = request.environ.get("waitress.client_disconnected")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back
    body = event_stream(store, held, last_id, every, client_gone)
    response = Response(body, mimetype="text/event-stream", headers=headers)
    response.call_on_close(release)  # the server closes every answer: once sent, or once its client left
    return response


def take_stream_slot(held: HeldJob):
    """Takes one of the server's event-stream threads and one of the job's STREAMS_PER_JOB, or refuses with a 503
    that says to poll instead; returns what gives them back."""
    slots = stream_slots(current_app)
    busy = "too many event streams are open{}; poll GET /jobs/<id> instead, or try again"
    if not slots.acquire(blocking=False):
        raise ImagineError(busy.format(""), 503, retry_after=1)
    if not held.open_stream(STREAMS_PER_JOB):
        slots.release()
        raise ImagineError(busy.format(f" for job {held.id} (at most {STREAMS_PER_JOB})"), 503, retry_after=1)

    def release():
        held.close_stream()
        slots.release()

    return release


@blueprint.delete("/jobs/<job_id>")
def cancel_route(job_id):
    store = current_jobs()
    held = store.get(job_id)
    if held.status in ENDED:
        message = f"job {held.id} has already ended ({held.status}): there is nothing to cancel"
        return jsonify(error=message, id=held.id, status=held.status), 409
    store.cancel(held)
    # A queued job is cancelled at once (200); a running one stops at its next cancel point, which a model that loads
    # reaches only when it has loaded: the answer does not wait on a server thread for it (202, "cancelling").
    if held.status in ENDED:
        return jsonify(job_fields(store, held))
    return jsonify({**job_fields(store, held), "cancelling": True}), 202
