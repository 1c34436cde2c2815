"""The jobs of POST /jobs in a fleet (engine/fleet.py): JobStore's interface over Redis, so that a job submitted to
one server is watched, cancelled and collected on any. Each server follows the jobs its clients ask about in HeldJobs
of its own, fed from the job's events in Redis from the first: every server counts the same event ids, so that a
client's Last-Event-ID means the same wherever the load balancer sends it."""

import json
import threading
import time

from engine.errors import ImagineError
from engine.held_jobs import HeldJob
from engine.job import Failed, Finished, Loading, Started
from engine.job_codec import request_from_data
from engine.request import GenerationRequest

WITHDRAW_SECONDS = 5.0  # how long a DELETE of a waiting job waits for its end to come back from Redis


class RemoteJob:
    """Stands, in a HeldJob, for the engine's Job of a fleet job, which any server may be drawing: its event streams'
    previews and the polls for its preview go to Redis, for the server drawing it."""

    def __init__(self, fleet, job_id: str, request: GenerationRequest):
        self.fleet, self.id = fleet, job_id
        self.request = request

    def watch(self, every: int, watching: bool = True) -> None:
        self.fleet.watch(self.id, every, watching)

    def latest_preview(self):
        png = self.fleet.latest_preview(self.id)
        return None if png is None else StoredPreview(png)


class StoredPreview:
    """A preview as Redis holds it: its PNG, base64, as HeldJob.preview reads it."""

    def __init__(self, png: str):
        self.png = png


class FleetStore:
    """JobStore's interface (submit, get, listing, cancel, position, expire) for a fleet. The fleet's jobs expire
    in Redis (--job-ttl after their end, on Redis's clock); the HeldJobs here are only what this server follows, let
    go on the same TTL on its own clock, or past --max-jobs the oldest ended first, and followed again from Redis if
    asked for again."""

    def __init__(self, fleet, clock=time.time):
        self.fleet = fleet
        self.engine = fleet.engine
        self.clock = clock
        self.held = {}  # id -> HeldJob followed here
        self.lock = threading.Lock()

    def submit(self, req: GenerationRequest) -> HeldJob:
        """Queues a request as a fleet job; refused as the engine refuses (an unknown model), or with 503 where the
        fleet's queue is full or cannot be reached, keeping nothing."""
        # No client_gone: a client that leaves (a reload, a phone asleep) does not cancel its job.
        job = self.engine.accept(req)
        job_id, created = self.fleet.enqueue(job)
        return self.followed(job_id, created, job.request)

    def followed(self, job_id: str, created: float, request: GenerationRequest) -> HeldJob:
        """The job, followed here from its first event on."""
        held = HeldJob(job_id, self.clock, request.prompt, request.num_steps or 0)
        held.created = created  # Redis's time, the same on every server
        held.attach(RemoteJob(self.fleet, job_id, request))
        with self.lock:
            self.held[job_id] = held
        self.fleet.follow(job_id, lambda event, data: take_event(held, event, data))
        return held

    def get(self, job_id: str) -> HeldJob:
        """The job `job_id`, wherever it was submitted: the same 404 for an id never given and an expired one."""
        self.expire()
        with self.lock:
            held = self.held.get(job_id)
        if held is not None:
            return held
        fields = self.fleet.job_fields(job_id, "created", "request") if len(job_id) <= 64 else None
        if fields is None:
            shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
            raise ImagineError(f"no job {shown!r}: no such id, or it ended over --job-ttl seconds ago", 404)
        return self.followed(job_id, float(fields["created"]), request_from_data(json.loads(fields["request"])))

    def listing(self) -> list:
        """The fleet's jobs, newest first, each with the server that drew it."""
        return [Listed(**fields) for fields in self.fleet.listing()]

    def cancel(self, held: HeldJob) -> None:
        """Cancels a waiting job at once, a running one (on whichever server draws it) before its next step."""
        if self.fleet.cancel(held.id, f"cancelled by DELETE /jobs/{held.id}") == "withdrawn":
            held.wait_end(WITHDRAW_SECONDS)  # its end comes back through Redis: the answer tells it has ended

    def position(self, held: HeldJob) -> int | None:
        return self.fleet.position(held.id)

    def expire(self) -> None:
        """Lets go of the jobs followed here that ended over the TTL ago, then, past the cap, the oldest ended."""
        settings, now = self.engine.settings, self.clock()
        with self.lock:
            ended = sorted((held for held in self.held.values() if held.finished is not None), key=finished_at)
            for index, held in enumerate(ended):
                if now - held.finished >= settings.job_ttl or index < len(ended) - settings.max_jobs:
                    del self.held[held.id]


class Listed:
    """A fleet job as GET /jobs lists it."""

    def __init__(self, id: str, status: str, created: float, server: str | None, attempts: int | None):
        self.id, self.status, self.created = id, status, created
        self.server, self.attempts = server, attempts


def take_event(held: HeldJob, event, data: dict) -> None:
    """Puts one event from Redis in the HeldJob, with its time on Redis's clock (the same on every server): a
    Loading one tells which server draws the job, and how many times it has been drawn."""
    held.put(event)
    with held.changed:
        if isinstance(event, Loading):
            held.server, held.attempts = data.get("server"), data.get("attempt")
        elif isinstance(event, Started):
            held.started = data.get("at", held.started)
        elif isinstance(event, (Finished, Failed)):
            held.finished = data.get("at", held.finished)


def finished_at(held: HeldJob) -> float:
    return held.finished
