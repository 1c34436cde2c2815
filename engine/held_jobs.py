"""Jobs that outlive their connection (POST /jobs): each held with the log of its events, so that a client that
comes back picks its stream up where it left it; finished ones are kept --job-ttl seconds, at most --max-jobs. With a
ledger (engine/job_ledger.py, the server's --state-dir), they outlive the process too: each change is written there,
and a server that starts takes back the jobs the last one left."""

import dataclasses
import logging
import secrets
import sqlite3
import threading
import time
import weakref

from engine.engine import Engine
from engine.errors import ImagineError
from engine.job import Failed, Finished, Job, Loading, Preview, Progress, Started
from engine.job_ledger import JobLedger
from engine.request import GenerationRequest, with_seeds

log = logging.getLogger("imagine")

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

    def __init__(self, job_id: str, clock, prompt: str, steps: int, keep=None, ticks=time.monotonic):
        self.id = job_id
        self.prompt = prompt  # what the job draws, for a client that names its file after it (imagine --job)
        self.clock = clock
        self.created, self.started, self.finished = clock(), None, None
        # ticks() when it ended, which its age is measured from: a wall clock set back or forward cannot expire it
        self.ticks, self.ended = ticks, None
        self.keep = keep  # keep(held, event) writes what each event changed to the ledger; None: kept in memory only
        self.attempts = 0  # how often it started running, in this process and those before it
        self.status = "queued"
        self.step, self.steps = 0, steps
        self.error = None  # why it failed or was cancelled
        self.server = None  # in a fleet, the server that drew it (attempts then counts the fleet's draws)
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
        """Takes one event from the engine (on its thread, or on the thread that cancels the job), then keeps it."""
        with self.changed:
            if self.status in ENDED:
                return
            self.take(event)
        if self.keep is not None:  # outside the lock: a finished job's pictures are written while its clients read
            self.keep(self, event)

    def take(self, event) -> None:
        if isinstance(event, Loading):  # running from the moment the engine takes it, its model loading included
            self.status = "running"
            self.attempts += 1
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
        self.status, self.finished, self.ended = status, self.clock(), self.ticks()
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
    flood of jobs cannot push it out. The unfinished are bounded by the engine's queue.

    With a `ledger`, every job is written there before its 202 and each change after, and the jobs it holds are taken
    back at once (restore). `clock` gives the wall-clock times jobs show and the ledger keeps; `ticks` the monotonic
    one their age is measured by."""

    def __init__(self, engine: Engine, clock=time.time, ledger: JobLedger | None = None, ticks=time.monotonic):
        self.engine = engine
        self.clock, self.ticks = clock, ticks
        self.ledger = ledger
        self.held = {}  # id -> HeldJob, oldest first
        self.lock = threading.Lock()
        if ledger is not None:
            self.restore()
        sweeper = threading.Thread(target=sweep, args=(weakref.ref(self),), name="job-sweeper", daemon=True)
        sweeper.start()

    def submit(self, req: GenerationRequest) -> HeldJob:
        """Queues a request as a job; refused as the engine refuses (full queue, unknown model), or with 507 where the
        ledger's disk is full, keeping nothing. Its seeds are drawn here, so that the ledger keeps them."""
        req = with_seeds(req)
        held = self.new_job(secrets.token_hex(16), req.prompt, req.num_steps or 0)
        if self.ledger is not None:
            self.ledger.check_room(req, self.engine.settings.max_size)
            self.ledger.add(held.id, req, held.created)
        try:
            self.queue(held, req)
        except ImagineError:
            if self.ledger is not None:
                self.ledger.forget([held.id])
            raise
        self.expire()
        return held

    def new_job(self, job_id: str, prompt: str, steps: int) -> HeldJob:
        keep = None if self.ledger is None else self.keep
        return HeldJob(job_id, self.clock, prompt, steps, keep, self.ticks)

    def queue(self, held: HeldJob, req: GenerationRequest) -> None:
        """Hands the job to the engine and holds it."""
        # No client_gone: a client that leaves (a reload, a phone asleep) does not cancel its job.
        held.attach(self.engine.submit(req, None, events=held))
        with self.lock:
            self.held[held.id] = held

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
        first, freeing their pictures (and the ledger's rows and files)."""
        settings, now = self.engine.settings, self.ticks()
        with self.lock:
            ended = [held for held in self.held.values() if held.ended is not None]
            gone = [held for held in ended if now - held.ended >= settings.job_ttl]
            ended = [held for held in ended if held not in gone]
            collected = sorted((held for held in ended if held.collected()), key=ended_at)
            gone += collected[: max(0, len(ended) - settings.max_jobs)]
            for held in gone:
                del self.held[held.id]
        if gone and self.ledger is not None:
            try:
                self.ledger.forget([held.id for held in gone])
            except (OSError, sqlite3.Error) as error:  # the sweeper, which calls this, must outlive a bad disk
                log.error("could not delete expired jobs from the state folder: %s", error)

    # -----------------------------------------------------------------------------------------
    # The ledger
    # -----------------------------------------------------------------------------------------

    def keep(self, held: HeldJob, event) -> None:
        """Writes to the ledger what `event` changed of `held` (on the engine's thread, mostly). A write that fails
        is logged: the job goes on in memory, and the server with it."""
        ledger, job_id = self.ledger, held.id
        try:
            if isinstance(event, Loading):
                ledger.update(job_id, status="running", attempts=held.attempts, step=0)
            elif isinstance(event, Started):
                ledger.update(job_id, started=held.started)
            elif isinstance(event, Progress) or isinstance(event, Preview) and event.index == 0:  # those it logs
                ledger.update(job_id, step=held.step, steps=held.steps, last_id=held.last_id)
            elif isinstance(event, Failed) and self.stopped_by_server(event):
                ledger.requeue(job_id, held.last_id)
            elif isinstance(event, (Finished, Failed)):
                columns = {"status": held.status, "finished": held.finished, "last_id": held.last_id}
                columns |= {"error": held.error, "step": held.step, "steps": held.steps}
                if isinstance(event, Finished):
                    ledger.finish(job_id, event, **columns)
                else:
                    ledger.update(job_id, **columns)
        except (OSError, sqlite3.Error, ValueError) as error:
            log.error("could not keep job %s in the state folder: %s", job_id, error)

    def stopped_by_server(self, event: Failed) -> bool:
        """Whether a job was cancelled by the server stopping (SIGTERM: an upgrade, systemctl restart), which runs
        it again when it starts, rather than by its client."""
        return event.cancelled and self.engine.stopping and event.error.status == 503

    def restore(self) -> None:
        """Takes back the jobs the ledger holds, in the order they were accepted: ended ones as they ended, until
        their TTL; unfinished ones queued again, one that was running drawn again from the start with the same seeds,
        unless the server stopped --job-attempts times while drawing it."""
        now, tick = self.clock(), self.ticks()
        counts = {"queued again": 0, "ended": 0, "failed": 0}
        for row in self.ledger.rows():
            held = self.new_job(row["id"], row["prompt"], row["steps"])
            held.created, held.started, held.attempts = row["created"], row["started"], row["attempts"]
            held.step, held.last_id = row["step"], row["last_id"]
            if row["status"] in ENDED:
                self.restore_ended(held, row, now, tick)
                counts["ended"] += 1
            else:
                # Its streams may have sent one event more than was written (the server died between the two): a
                # client's Last-Event-ID may be that one, and the events from now on are numbered after it.
                held.last_id += 1
                counts["queued again" if self.requeue(held, row) else "failed"] += 1
        if any(counts.values()):
            log.info(
                "took back the jobs kept in %s: %s",
                self.ledger.folder, ", ".join(f"{count} {what}" for what, count in counts.items()),
            )  # fmt: skip
        self.expire()

    def restore_ended(self, held: HeldJob, row: dict, now: float, tick: float) -> None:
        """An ended job as it ended. Its age is the wall clock's since it ended, taken as 0 where the clock reads
        earlier than that (it was set back), and from then on the monotonic clock's: no clock's jump drops it early."""
        held.status, held.finished, held.error, held.steps = row["status"], row["finished"], row["error"], row["steps"]
        held.ended = tick - min(max(now - row["finished"], 0.0), self.engine.settings.job_ttl)
        if held.status == "done":
            try:
                held.result = self.ledger.read_result(row)
            except (OSError, ValueError, KeyError) as error:
                held.status, held.error, held.result = "failed", f"its pictures could not be read back: {error}", None
        held.log = [Record(held.last_id, held.status, held.step, held.steps)]
        with self.lock:
            self.held[held.id] = held

    def requeue(self, held: HeldJob, row: dict) -> bool:
        """Queues an unfinished job again; False where it failed instead, saying why."""
        attempts = self.engine.settings.job_attempts
        with self.lock:
            self.held[held.id] = held
        try:
            if row["status"] == "running" and row["attempts"] >= attempts:
                times = "once" if row["attempts"] == 1 else f"{row['attempts']} times"
                why = f"the server stopped {times} while drawing it (--job-attempts {attempts})"
                raise ImagineError(why, 500)
            self.queue(held, self.ledger.read_request(row))
            return True
        except (OSError, ValueError, KeyError) as error:
            held.put(Failed(ImagineError(f"its request could not be read back: {error}", 500)))
        except ImagineError as error:
            held.put(Failed(error))
        return False


def ended_at(held: HeldJob) -> float:
    return held.ended


def sweep(store_ref) -> None:
    """Expires jobs every SWEEP_SECONDS while the store exists (it holds no reference to it in between)."""
    while (store := store_ref()) is not None:
        store.expire()
        del store
        time.sleep(SWEEP_SECONDS)
