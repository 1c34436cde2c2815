"""Several servers sharing one queue (--queue redis://host:6379/0): every server puts the jobs of all its routes in
Redis, and draws from there the next job when its engine is idle, preferring one for a model it has loaded; the
drawing server writes the job's events to Redis, and any server follows them (engine/fleet_jobs.py).

What Redis holds, every key under imagine: (the servers trust it as they trust their disk; docs/server.md, A fleet):
- queue:<model>    a stream for each model key, with the consumer group "drawers": an entry {job: id} a submission.
                   One stream a model, so that a server can draw the jobs of its loaded model first: a consumer group
                   hands out one stream's entries in order only. An entry stays pending with the server that drew it
                   until the job ends, so that a dead server's jobs are claimed (XCLAIM) and drawn again by another.
- models           the model keys that have a stream.
- submitted        a stream with a mark for each submission, capped: idle servers wait on it, so that a job is drawn
                   at once rather than at their next look.
- waiting, jobs    sorted sets of job ids in submission order: the jobs not yet drawn, and every job not yet expired.
- job:<id>         a hash: the request (engine/job_codec.py), its status, the server that drew it and the attempt
                   (how many times it was drawn), and its latest preview of each picture (preview:<index>).
- job:<id>:events  a stream of its events as job_codec writes them, each preview only a mark: its picture is the
                   hash's, the latest, so that a long job's previews do not pile up.
- job:<id>:watch   the job's event streams open on any server, counted by their `every`; job:<id>:polled exists for
                   POLL_SECONDS after a poll for its preview. The drawing server previews for both.
- server:<name>    each server's heartbeat; it expires HEARTBEAT_TTL seconds after the last.
An ended job's keys expire --job-ttl seconds after its end, on Redis's clock: servers whose clocks disagree expire
nothing early, as no server's clock decides it."""

import collections
import contextlib
import json
import logging
import os
import queue
import secrets
import threading
import time

import redis

from engine.errors import ImagineError
from engine.fleet_scripts import CANCEL, CLAIM, ENQUEUE, WRITE
from engine.job import POLL_SECONDS, Failed, Finished, Loading, Preview, Started
from engine.job_codec import event_data, event_from_data, request_data, request_from_data
from engine.logs import shown_url

log = logging.getLogger("imagine")

PREFIX = "imagine:"
GROUP = "drawers"
WAITING, JOBS, MODELS, SEQUENCE, SUBMITTED = (
    PREFIX + name for name in ("waiting", "jobs", "models", "sequence", "submitted")
)
HEARTBEAT_SECONDS = 1.0  # how often a server tells Redis it is alive
HEARTBEAT_TTL = 5  # seconds after a server's last heartbeat that the jobs it drew are drawn again by another
LOOK_SECONDS = 0.2  # how often a drawing server looks for its job's cancel and watchers, and an idle one for a job
RETRY_AFTER = 5  # seconds a client is told to wait while Redis cannot be reached
PRUNED_EACH_BEAT = 20  # expired jobs' ids a heartbeat may take out of the list of jobs: more than a fleet draws


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def queue_key(model: str) -> str:
    return f"{PREFIX}queue:{model}"


def server_key(consumer: str) -> str:
    return f"{PREFIX}server:{consumer}"


def connect(url: str) -> redis.Redis:
    """A client of the Redis at `url`, its password from the URL or else IMAGINE_REDIS_PASSWORD, checked with a
    PING; where Redis cannot be reached the start ends, naming the URL without its password."""
    password = os.environ.get("IMAGINE_REDIS_PASSWORD") or None  # one in the URL is used before it
    client = redis.Redis.from_url(
        url, password=password, decode_responses=True, socket_timeout=10, socket_connect_timeout=5
    )
    try:
        client.ping()
    except redis.RedisError as error:
        raise SystemExit(f"imagine: cannot reach Redis at {shown_url(url)} (--queue, IMAGINE_QUEUE): {error}") from None
    return client


class Fleet:
    """This server's part of the fleet: it submits jobs to Redis, draws jobs from it for its engine (one at a time,
    when the engine is idle, so that waiting jobs go to whichever server is free), writes the events of the jobs it
    draws, tells it is alive, and draws again the jobs of servers that stopped telling it.

    One thread (run) beats, looks for jobs and watches the job drawn for a cancel; another (write_forever) writes
    the engine's events in order, keeping them while Redis cannot be reached, so that the engine never waits on
    Redis and a job it has taken finishes whatever Redis does."""

    def __init__(self, client: redis.Redis, engine, server: str, url: str):
        self.redis = client
        self.engine = engine
        self.server = server  # host:port, as GET /jobs shows the server that drew a job
        self.consumer = f"{server}/{secrets.token_hex(4)}"  # this run of the server: one that restarts is another
        self.url = shown_url(url)
        self.drawing = {}  # job id -> (the engine's Job, attempt), while it runs here
        self.writes = queue.Queue()  # (Sink, event) for write_forever
        self.stopping = False
        self.connected_since = None  # time.monotonic() since Redis answers again; None while it does not
        self.submitted = "$"  # the last submission mark seen (see wait)
        self.scripts = {name: client.register_script(text) for name, text in
                        (("enqueue", ENQUEUE), ("claim", CLAIM), ("write", WRITE), ("cancel", CANCEL))}  # fmt: skip

    def start(self) -> None:
        threading.Thread(target=self.run, name="fleet-drawer", daemon=True).start()
        self.writer = threading.Thread(target=self.write_forever, name="fleet-writer", daemon=True)
        self.writer.start()

    def stop(self) -> None:
        """Stops drawing and lets the jobs drawn here go back to the fleet: their cancel by the engine's stop is not
        written, and, the heartbeat gone, another server draws them again. Waits (10 s at most) for the events the
        engine put before to be written."""
        self.stopping = True
        self.writes.put((None, None))
        self.writer.join(timeout=10)
        with contextlib.suppress(redis.RedisError):  # else it expires by itself
            self.redis.delete(server_key(self.consumer))

    def unreachable(self, error: Exception) -> ImagineError:
        """The 503 for a request while Redis cannot be reached; the log names the URL (without its password)."""
        log.warning("the fleet's queue at %s cannot be reached: %s", self.url, error)
        return ImagineError("the fleet's queue (Redis) cannot be reached; try again", 503, RETRY_AFTER)

    # -----------------------------------------------------------------------------------------
    # Submitting and following
    # -----------------------------------------------------------------------------------------

    def submit(self, req, client_gone=None, default_if_unknown: bool = False, interruptible: bool = False):
        """Engine.submit for a fleet: the job is checked here as the engine checks it, then queued in Redis; its
        events come into its `events` from whichever server draws it. A client that leaves cancels it."""
        job = self.engine.accept(req, client_gone, default_if_unknown, None, interruptible)
        job_id, _ = self.enqueue(job, default_if_unknown, interruptible)
        self.follow(job_id, lambda event, data: job.events.put(event), job)
        return job

    def enqueue(self, job, default_if_unknown: bool = False, interruptible: bool = False) -> tuple:
        """Queues an accepted engine Job in Redis; (its id, when Redis took it); refused with 503 where the fleet's
        queue is full or cannot be reached."""
        job_id = secrets.token_hex(16)  # 128 random bits, as a lone server's (see JobStore)
        req = job.request
        options = {"default_if_unknown": default_if_unknown, "interruptible": interruptible}
        fields = ["request", json.dumps(request_data(req)), "prompt", req.prompt, "steps", req.num_steps or 0]
        keys = [job_key(job_id), WAITING, JOBS, queue_key(job.model_key), MODELS, SEQUENCE, SUBMITTED]
        try:
            self.check_room()
            created = self.scripts["enqueue"](keys, [job_id, job.model_key, GROUP, *fields, "options",
                                                     json.dumps(options)])  # fmt: skip
        except redis.RedisError as error:
            raise self.unreachable(error) from None
        return job_id, float(created)

    def check_room(self) -> None:
        """Refuses a job while as many wait as the live servers have room for: one drawing and --max-queue waiting
        each, as a lone server holds."""
        servers = self.servers()
        room = sum(server["room"] for server in servers) or self.engine.settings.max_queue + 1
        waiting = self.redis.zcard(WAITING)
        if waiting >= room:
            retry_after = max(1, round(self.engine.last_seconds * waiting / max(1, len(servers))))
            raise ImagineError(f"the fleet is busy: {waiting} requests are waiting; try again", 503, retry_after)

    def follow(self, job_id: str, put, job=None) -> None:
        """Hands the job's events to `put(event, data)` from its first: those already in Redis now, on this thread,
        the rest on a thread of their own until its end. Where `job` (the engine's Job of a client that waits on
        it) is cancelled, as when its client leaves, the job is cancelled in the fleet."""
        try:
            last = self.relay_once(job_id, put, "0", block=None)
        except redis.RedisError:  # the job is in Redis: its events come once Redis is back
            last = "0"
        if last is not None:
            threading.Thread(target=self.relay, args=(job_id, put, last, job), name="fleet-relay", daemon=True).start()

    def relay(self, job_id: str, put, last: str, job) -> None:
        while last is not None:
            try:
                last = self.relay_once(job_id, put, last, block=1000)
                if job is not None and job.cancelled():
                    self.cancel(job_id, job.cancel_reason.message)
                    job = None
            except (redis.RedisError, ImagineError):
                time.sleep(1)  # Redis is away: the events wait there until it is back
            except Exception:  # its client must hear of it rather than wait for ever
                log.exception("job %s's events cannot be read", job_id)
                put(Failed(ImagineError("the job's events cannot be read; the server log has the details", 500)), {})
                return

    def relay_once(self, job_id: str, put, last: str, block: int | None) -> str | None:
        """Hands the events after `last` to `put`; the last one's id, or None once the job has ended."""
        answer = self.redis.xread({events_key(job_id): last}, block=block)
        for _, entries in answer:
            for entry_id, fields in entries:
                last = entry_id
                data = json.loads(fields["event"]) | {"at": float(fields["at"])}  # when, on Redis's clock
                event = self.event_from(job_id, data)
                if event is not None:
                    put(event, data)
                if isinstance(event, (Finished, Failed)):
                    return None
        if not answer and block is not None and not self.redis.exists(job_key(job_id)):
            put(Failed(ImagineError(f"job {job_id} is gone from the fleet's queue", 410)), {})
            return None
        return last

    def event_from(self, job_id: str, data: dict):
        """The event the data in the job's stream stands for; a preview's mark with the latest picture (None once the
        job's keys expired)."""
        if data["event"] == "preview":
            png = self.redis.hget(job_key(job_id), f"preview:{data['index']}")
            if png is None:
                return None
            data = {**data, "image": {"png": png}}
        return event_from_data(data)

    def cancel(self, job_id: str, reason: str) -> str | None:
        """Cancels the job whichever server draws it: 'withdrawn' (it waited, and has ended), 'cancelling' (the
        server drawing it stops it at its next step), an ended job's status, or None for a job that is gone."""
        failed = json.dumps(event_data(Failed(ImagineError(reason, 499), cancelled=True)))
        keys = [job_key(job_id), events_key(job_id), WAITING]
        try:
            return self.scripts["cancel"](keys, [job_id, reason, failed, self.engine.settings.job_ttl])
        except redis.RedisError as error:
            raise self.unreachable(error) from None

    # -----------------------------------------------------------------------------------------
    # What the fleet holds
    # -----------------------------------------------------------------------------------------

    def servers(self) -> list:
        """The heartbeats of the live servers: {server, room, drawing}."""
        names = list(self.redis.scan_iter(match=server_key("*"), count=100))
        return [json.loads(value) for value in self.redis.mget(names) if value] if names else []

    def health(self) -> dict:
        """The fleet's queue, for /health and A1111's /progress: the live servers, the jobs waiting and those being
        drawn; where Redis cannot be reached, only that (the server still answers for itself)."""
        try:
            servers = self.servers()
            waiting = self.redis.zcard(WAITING)
        except redis.RedisError:
            return {"reachable": False}
        drawing = sum(server["drawing"] for server in servers)
        return {"reachable": True, "servers": len(servers), "waiting": waiting, "drawing": drawing}

    def position(self, job_id: str) -> int | None:
        try:
            return self.redis.zrank(WAITING, job_id)
        except redis.RedisError as error:
            raise self.unreachable(error) from None

    def job_fields(self, job_id: str, *names: str) -> dict | None:
        """Fields of the job's hash, or None for a job that is gone (never was, or expired)."""
        try:
            values = self.redis.hmget(job_key(job_id), "status", *names)
        except redis.RedisError as error:
            raise self.unreachable(error) from None
        return None if values[0] is None else dict(zip(("status", *names), values, strict=True))

    def forget_expired(self, most: int) -> None:
        """Takes out of the list of jobs the oldest `most` whose keys have expired, so that it does not grow without
        end where nobody lists the jobs (GET /jobs takes out every one)."""
        ids = self.redis.zrange(JOBS, 0, most - 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(job_key(job_id))
        gone = [job_id for job_id, exists in zip(ids, pipe.execute(), strict=True) if not exists]
        if gone:
            self.redis.zrem(JOBS, *gone)

    def listing(self) -> list:
        """Every job of the fleet not yet expired, newest first, as dicts {id, status, created, server, attempts};
        the ids of expired ones leave the list."""
        try:
            ids = self.redis.zrevrange(JOBS, 0, -1)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(job_key(job_id), "status", "created", "server", "attempt")
            values = pipe.execute()
            gone = [job_id for job_id, (status, *_) in zip(ids, values, strict=True) if status is None]
            if gone:
                self.redis.zrem(JOBS, *gone)
        except redis.RedisError as error:
            raise self.unreachable(error) from None
        return [
            {
                "id": job_id,
                "status": status,
                "created": float(created),
                "server": server,
                "attempts": None if attempt is None else int(attempt),
            }
            for job_id, (status, created, server, attempt) in zip(ids, values, strict=True)
            if status is not None
        ]

    def watch(self, job_id: str, every: int, watching: bool) -> None:
        """Counts an event stream on the job that wants a preview every `every` steps opening (or closing)."""
        key = f"{job_key(job_id)}:watch"
        try:
            pipe = self.redis.pipeline()
            pipe.hincrby(key, str(every), 1 if watching else -1)
            pipe.expire(key, self.engine.settings.job_ttl + HEARTBEAT_TTL)
            pipe.execute()
        except redis.RedisError as error:
            log.warning("a job stream's previews cannot be asked for: %s", error)

    def latest_preview(self, job_id: str) -> str | None:
        """The job's latest preview (base64 PNG), None before its first; asking keeps them coming for POLL_SECONDS,
        as on a lone server."""
        try:
            self.redis.set(f"{job_key(job_id)}:polled", 1, px=int(POLL_SECONDS * 1000))
            stored = self.redis.hget(job_key(job_id), "preview:0")
        except redis.RedisError as error:
            raise self.unreachable(error) from None
        return stored

    # -----------------------------------------------------------------------------------------
    # Drawing
    # -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Beats, watches the job drawn here, and when the engine is idle draws a job: a dead server's first."""
        beaten = 0.0
        while not self.stopping:
            try:
                if time.monotonic() - beaten >= HEARTBEAT_SECONDS:
                    self.heartbeat()
                    self.forget_expired(PRUNED_EACH_BEAT)
                    beaten = time.monotonic()
                self.watch_drawn()
                idle = self.engine.unfinished == 0 and not self.engine.stopping
                if not (idle and (self.reclaim() or self.take())):
                    self.wait(idle)
            except redis.RedisError as error:
                if self.connected_since is not None:
                    log.warning("the fleet's queue at %s cannot be reached: %s", self.url, error)
                self.connected_since = None
                time.sleep(LOOK_SECONDS)
            except Exception:  # the server must go on drawing whatever one look at Redis met
                log.exception("the fleet's drawer failed; it goes on")
                time.sleep(LOOK_SECONDS)

    def wait(self, idle: bool) -> None:
        """Waits LOOK_SECONDS; an idle server wakes as soon as a job is submitted anywhere."""
        if not idle:
            time.sleep(LOOK_SECONDS)
            return
        answer = self.redis.xread({SUBMITTED: self.submitted}, count=100, block=int(LOOK_SECONDS * 1000))
        for _, entries in answer:
            self.submitted = entries[-1][0]

    def heartbeat(self) -> None:
        value = {"server": self.server, "room": self.engine.settings.max_queue + 1, "drawing": len(self.drawing)}
        self.redis.set(server_key(self.consumer), json.dumps(value), px=HEARTBEAT_TTL * 1000)
        if self.connected_since is None:
            self.connected_since = time.monotonic()
            log.info("in the fleet at %s as %s", self.url, self.consumer)

    def take(self) -> bool:
        """Draws the next waiting job of a model loaded here, else the oldest waiting job; whether it drew one."""
        for model in self.preferred_models():
            stream = queue_key(model)
            try:
                answer = self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=1)
            except redis.ResponseError:  # a stream without its group: one Redis lost and got back empty
                continue
            for _, entries in answer:
                for entry_id, fields in entries:
                    self.draw(stream, entry_id, fields["job"])
                    return True
        return False

    def preferred_models(self) -> list:
        """The models whose streams a job is drawn from, in order: those loaded here (the last used first), the
        oldest waiting job's, then every other."""
        loaded = list(reversed(self.engine.models.loaded))
        oldest = self.redis.zrange(WAITING, 0, 0)
        first = [self.redis.hget(job_key(oldest[0]), "model")] if oldest else []
        models = [*loaded, *first, *sorted(self.redis.smembers(MODELS))]
        return [model for model in dict.fromkeys(models) if model is not None]

    def reclaim(self) -> bool:
        """Draws again a job whose server's heartbeat is gone; whether it drew one. Only once this server has been
        in touch with Redis for HEARTBEAT_TTL: after Redis was away, the others' heartbeats come back first."""
        if self.connected_since is None or time.monotonic() - self.connected_since < HEARTBEAT_TTL:
            return False
        idle = HEARTBEAT_TTL * 1000
        for model in self.redis.smembers(MODELS):
            stream = queue_key(model)
            try:
                pending = self.redis.xpending_range(stream, GROUP, "-", "+", 10, idle=idle)
            except redis.ResponseError:
                continue
            for entry in pending:
                if self.redis.exists(server_key(entry["consumer"])):
                    continue
                # Of several servers claiming the entry, one gets it: a claim makes it idle again.
                for entry_id, fields in self.redis.xclaim(stream, GROUP, self.consumer, idle, [entry["message_id"]]):
                    log.info("drawing again the job of %s, whose heartbeat is gone", entry["consumer"])
                    self.draw(stream, entry_id, fields["job"])
                    return True
        return False

    def draw(self, stream: str, entry_id: str, job_id: str) -> None:
        """Gives the job to the engine, its events written to Redis; a job that ended while it waited is let go."""
        attempt = self.scripts["claim"]([job_key(job_id), WAITING], [job_id, self.server, self.consumer])
        if not attempt:
            self.redis.xack(stream, GROUP, entry_id)
            self.redis.xdel(stream, entry_id)
            return
        sink = Sink(job_id, attempt, stream, entry_id, self.writes)
        request, options = self.redis.hmget(job_key(job_id), "request", "options")
        try:
            req, options = request_from_data(json.loads(request)), json.loads(options)
            job = self.engine.submit(req, None, options["default_if_unknown"], sink, options["interruptible"])
        except ImagineError as error:
            sink.put(Failed(error))
            return
        except ValueError as error:  # data of another version of Imagine, say
            sink.put(Failed(ImagineError(f"job {job_id}'s request cannot be read here: {error}", 500)))
            return
        log.info("drawing job %s (attempt %d)", job_id, attempt)
        self.drawing[job_id] = (job, attempt)

    def watch_drawn(self) -> None:
        """Hands the job drawn here what the fleet asks of it: a cancel, previews for the streams open on it and the
        polls for its preview; and stops it where another server has drawn it again (this one was taken for dead)."""
        for job_id, (job, attempt) in list(self.drawing.items()):
            key = job_key(job_id)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(key, "attempt", "cancel")
            pipe.hgetall(f"{key}:watch")
            pipe.exists(f"{key}:polled")
            (now_attempt, cancel), watching, polled = pipe.execute()
            if now_attempt != str(attempt):
                job.cancel(ImagineError(f"job {job_id} is drawn again by another server", 409))
            elif cancel:
                job.cancel(ImagineError(cancel, 499))
            with job.watchers:
                job.watching = collections.Counter({int(every): int(n) for every, n in watching.items() if int(n) > 0})
            if polled:
                job.polled = time.monotonic()

    # -----------------------------------------------------------------------------------------
    # Writing the events of the jobs drawn here
    # -----------------------------------------------------------------------------------------

    def write_forever(self) -> None:
        """Writes the events the engine put in the sinks, in order; one Redis cannot take now waits until it can."""
        while True:
            sink, event = self.writes.get()
            if sink is None:
                return
            if self.stopping and isinstance(event, Failed) and event.cancelled:
                continue  # the engine's stop cancelled it: it goes back to the fleet (see stop)
            while not self.write(sink, event):
                time.sleep(1)

    def write(self, sink, event) -> bool:
        """Writes one event; False where Redis cannot be reached."""
        data, stamp, status, fields = event_data(event), "", "", []
        if isinstance(event, Loading):
            data |= {"server": self.server, "attempt": sink.attempt}
        elif isinstance(event, Started):
            stamp = "started"
        elif isinstance(event, Preview):
            fields = [f"preview:{event.index}", data.pop("image")["png"]]
        elif isinstance(event, Finished):
            stamp, status = "finished", "done"
        elif isinstance(event, Failed):
            stamp, status = "finished", "cancelled" if event.cancelled else "failed"
            fields = ["error", event.error.message]
        keys = [job_key(sink.job_id), events_key(sink.job_id), sink.stream]
        ttl = self.engine.settings.job_ttl
        try:
            self.scripts["write"](keys, [sink.attempt, json.dumps(data), stamp, status, ttl, GROUP, sink.entry_id,
                                         *fields])  # fmt: skip
        except redis.RedisError as error:
            log.warning("job %s's events wait for Redis at %s: %s", sink.job_id, self.url, error)
            return False
        if status:
            self.drawing.pop(sink.job_id, None)
        return True


class Sink:
    """Where the engine puts the events of a job drawn from the fleet (see Job.events): onto the fleet's writer."""

    def __init__(self, job_id: str, attempt: int, stream: str, entry_id: str, writes: queue.Queue):
        self.job_id, self.attempt = job_id, attempt
        self.stream, self.entry_id = stream, entry_id  # the job's entry in its model's stream
        self.writes = writes

    def put(self, event) -> None:
        self.writes.put((self, event))
