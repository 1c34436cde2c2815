"""Jobs that outlive their connection (POST /jobs): each held with the log of its events, so that a client that
comes back picks its stream up where it left it; finished ones are kept --job-ttl seconds, at most --max-jobs."""

import dataclasses
import secrets
import threading
import time
import weakref

from engine.engine import Engine
from engine.errors import ImagineError
from engine.job import Failed, Finished, Job, Loading, Preview, Progress, Started
from engine.request import GenerationRequest

ENDED = ("done", "failed", "cancelled")
SWEEP_SECONDS = 1.0  # how often expired jobs are looked for, so that their pictures go without a request


@dataclasses.dataclass(frozen=True)
class Record:
    """One event in a held job's log; `id` counts up from 1 within the job, as its stream's `id:` lines say."""

    id: int
    kind: str  # progress, preview, or how the job ended: done, failed or cancelled
    step: int
    steps: int
    preview: Preview | None = None  # a preview's picture, encoded by the first reader that sends it


class HeldJob:
    """A job kept for clients that come and go: where it stands, the log of its events, then its result.

    The engine puts the job's events here (see Job.events): they are the one account of where it stands. The log
    keeps what a client that reconnects needs: every progress event (one a step, so at most MAX_STEPS), the latest
    preview of the first picture only (a new one replaces it), and the end. When the job ends, the preview and the
    engine's Job (its request and input pictures) are let go: what stays is the log, a few numbers and the finished
    pictures."""

    def __init__(self, job_id: str, clock, prompt: str, steps: int):
        self.id = job_id
        self.prompt = prompt  # what the job draws, for a client that names its file after it (imagine --job)
        self.clock = clock
        self.created, self.started, self.finished = clock(), None, None
        self.status = "queued"
        self.step, self.steps = 0, steps
        self.error = None  # why it failed or was cancelled
        self.server, self.attempts = None, None  # in a fleet, the server that drew it and how often it was drawn
        self.job = None  # the engine's Job, until it ends
        self.result = None  # the Finished event, until the first client that asks has it translated
        self.answer = None  # the translated result, kept in its place
        self.log = []
        self.last_id = 0
        self.streams = 0  # its event streams open now (api/jobs.py caps them)
        self.changed = threading.Condition()  # guards all of the above; notified at each new record

    def attach(self, job) -> None:
        with self.changed:
            if self.status not in ENDED:  # a job may end before submit() has returned it
                self.job = job
                self.steps = self.steps or job.request.num_steps or 0  # the family's, where the request gave none

    def put(self, event) -> None:
        """Takes one event from the engine (on its thread, or on the thread that cancels the job)."""
        with self.changed:
            if self.status in ENDED:
                return
            if isinstance(event, Loading):  # running from the moment the engine takes it, its model loading included
                self.status = "running"
            elif isinstance(event, Started):
                self.started = self.clock()
            elif isinstance(event, Progress):
                self.step, self.steps = event.step, event.steps
                self.append("progress")
            elif isinstance(event, Preview) and event.index == 0:  # the first picture's, in the last one's place
                self.log = [record for record in self.log if record.kind != "preview"]
                self.append("preview", event)
            elif isinstance(event, Finished):
                self.result = event
                self.end("done")
            elif isinstance(event, Failed):
                self.error = event.error.message
                self.end("cancelled" if event.cancelled else "failed")

    def append(self, kind: str, preview: Preview | None = None) -> None:
        self.last_id += 1
        self.log.append(Record(self.last_id, kind, self.step, self.steps, preview))
        self.changed.notify_all()

    def end(self, status: str) -> None:
        self.status, self.finished = status, self.clock()
        self.job = None
        self.log = [record for record in self.log if record.kind != "preview"]
        self.append(status)

    def preview(self) -> str | None:
        """The latest preview (base64 PNG) while the job runs, None before its first and once it ended; asking keeps
        them coming (Job.latest_preview)."""
        job = self.job
        latest = None if job is None else job.latest_preview()
        return None if latest is None else latest.png

    def watch(self, every: int | None, watching: bool = True) -> Job | None:
        """An event stream that wants a preview every `every` steps opens (or closes); the engine's Job it watched,
        for closing it, or None where there is nothing to watch (no `every`, or the job ended)."""
        job = self.job
        if every is None or job is None:
            return None
        job.watch(every, watching)
        return job

    def records_after(self, last_id: int, timeout: float) -> list:
        """The records after `last_id`, waiting up to `timeout` seconds for one if there are none yet."""
        with self.changed:
            if self.last_id <= last_id and self.status not in ENDED:
                self.changed.wait(timeout)
            return [record for record in self.log if record.id > last_id]

    def wait_end(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.status in ENDED, timeout)

    def open_stream(self, most: int) -> bool:
        """Counts an event stream opening, if fewer than `most` are open; False where as many are."""
        with self.changed:
            if self.streams >= most:
                return False
            self.streams += 1
            return True

    def close_stream(self) -> None:
        with self.changed:
            self.streams -= 1

    def collected(self) -> bool:
        """Whether the job holds nothing left for its client to collect: it failed, was cancelled, or its pictures
        were fetched once (GET /jobs/<id> or its stream's `done` event)."""
        return self.status != "done" or self.answer is not None

    def result_fields(self, translate) -> dict:
        """The finished job's answer, translated (`translate(finished)`) the first time it is asked for; the
        pictures are encoded off the engine's thread, then kept as encoded only."""
        with self.changed:
            if self.answer is None and self.result is not None:
                self.answer, self.result = translate(self.result), None
            return self.answer or {}


class JobStore:
    """The jobs the server holds, by id. Ids are 128 random bits: anyone who can reach the server could otherwise
    fetch another client's pictures. A finished job goes after `job_ttl` seconds, or earlier when more than
    `max_jobs` have finished: first those that hold no picture to collect (failed, cancelled, or done and collected),
    the oldest first; a done job whose pictures nobody has collected stays its whole TTL, so that another client's
    flood of jobs cannot push it out. The unfinished are bounded by the engine's queue."""

    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self.clock = clock
        self.held = {}  # id -> HeldJob, oldest first
        self.lock = threading.Lock()
        sweeper = threading.Thread(target=sweep, args=(weakref.ref(self),), name="job-sweeper", daemon=True)
        sweeper.start()

    def submit(self, req: GenerationRequest) -> HeldJob:
        """Queues a request as a job; refused as the engine refuses (full queue, unknown model), keeping nothing."""
        held = HeldJob(secrets.token_hex(16), self.clock, req.prompt, req.num_steps or 0)
        # No client_gone: a client that leaves (a reload, a phone asleep) does not cancel its job.
        held.attach(self.engine.submit(req, None, events=held))
        with self.lock:
            self.held[held.id] = held
        self.expire()
        return held

    def get(self, job_id: str) -> HeldJob:
        """The job `job_id`: the same dictionary look-up, and the same 404, for an id never given and an expired
        one (expired jobs are out of the dictionary)."""
        self.expire()
        with self.lock:
            held = self.held.get(job_id)
        if held is None:
            shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
            raise ImagineError(f"no job {shown!r}: no such id, or it ended over --job-ttl seconds ago", 404)
        return held

    def listing(self) -> list:
        """The jobs held, newest first."""
        self.expire()
        with self.lock:
            return list(reversed(self.held.values()))

    def cancel(self, held: HeldJob) -> None:
        """Cancels a queued job at once (its place in the queue is freed), a running one before its next step."""
        job = held.job
        if job is None:
            return
        reason = ImagineError(f"cancelled by DELETE /jobs/{held.id}", 499)
        if not self.engine.withdraw(job, reason):
            job.cancel(reason)

    def position(self, held: HeldJob) -> int | None:
        job = held.job
        return None if job is None else self.engine.position(job)

    def expire(self) -> None:
        """Drops the finished jobs past the TTL, then, past the cap, those holding nothing left to collect, oldest
        first, freeing their pictures."""
        settings, now = self.engine.settings, self.clock()
        with self.lock:
            for held in list(self.held.values()):
                if held.finished is not None and now - held.finished >= settings.job_ttl:
                    del self.held[held.id]
            ended = [held for held in self.held.values() if held.finished is not None]
            collected = sorted((held for held in ended if held.collected()), key=finished_at)
            for held in collected[: max(0, len(ended) - settings.max_jobs)]:
                del self.held[held.id]


def finished_at(held: HeldJob) -> float:
    return held.finished


def sweep(store_ref) -> None:
    """Expires jobs every SWEEP_SECONDS while the store exists (it holds no reference to it in between)."""
    while (store := store_ref()) is not None:
        store.expire()
        del store
        time.sleep(SWEEP_SECONDS)
