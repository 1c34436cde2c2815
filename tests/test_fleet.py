"""A fleet (--queue redis://...): real servers on the demo model sharing one Redis, started by the tests from the
distribution's redis-server on a free port of 127.0.0.1, in a temporary folder, and stopped after. Jobs submitted
to one server are drawn by whichever is idle, followed, cancelled and collected on any, and a killed server's job is
drawn again by another."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import FAST, free_port, pixels, wait_until
from jobs_client import parse_events

import imagine
from api.native import last_event
from engine.fleet import JOBS, WAITING, Fleet, connect, job_key
from engine.fleet_jobs import FleetStore
from engine.request import GenerationRequest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="redis-server is not installed (apt-get install redis-server)"
)
IMAGINE = Path(imagine.__file__).resolve()
START_SECONDS = 300  # a server's start imports torch: minutes on a busy machine with 2 cores
SHORT = {"width": 64, "height": 64, "num_steps": 12}
LONG = {"width": 128, "height": 128, "num_steps": 150}  # long enough to be caught while it runs


class RedisServer:
    """redis-server on a free port of 127.0.0.1, its files in `folder`; without persistence unless `options`."""

    def __init__(self, folder: Path, *options: str):
        self.folder, self.options = folder, options
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--save", "", "--appendonly", "no", *self.options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=password_of(self.options))
        wait_until(lambda: answers(client), "redis-server answers")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def password_of(options) -> str | None:
    return options[options.index("--requirepass") + 1] if "--requirepass" in options else None


def answers(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of its own for the test, stopped after."""
    servers = []

    def start(*options):
        server = RedisServer(tmp_path, *options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.stop()


class Imagine:
    """An imagine.py process, its log in a file."""

    def __init__(self, folder: Path, name: str, queue: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"{name}.log"
        command = [sys.executable, str(IMAGINE), "--port", str(self.port), "-d", "cpu", "--models-dir", str(folder)]
        clean = {key: value for key, value in os.environ.items() if not key.startswith("IMAGINE_")}
        self.queue = queue
        with self.log.open("w") as log:
            self.process = subprocess.Popen([*command, "--queue", queue], env=clean | (env or {}), stderr=log)

    def wait_listening(self) -> None:
        wait_until(lambda: "listening on" in self.text() or self.process.poll() is not None, "listening", START_SECONDS)
        assert "listening on" in self.text(), self.text()

    def text(self) -> str:
        return self.log.read_text()

    def drawn(self) -> list:
        """The ids of the jobs this server drew, as its log tells."""
        return re.findall(r"drawing job (\w+)", self.text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def start_servers(folder: Path, queue: str, count: int, env: dict | None = None) -> list:
    servers = [Imagine(folder, f"server-{index}", queue, env) for index in range(count)]
    for server in servers:
        server.wait_listening()
    return servers


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three servers on one Redis; the last test kills one."""
    folder = tmp_path_factory.mktemp("fleet")
    server = RedisServer(folder)
    server.start()
    servers = start_servers(folder, server.url, 3)
    yield servers
    for each in servers:
        each.stop()
    server.stop()


def submit(server: Imagine, prompt: str, seed: int, size=SHORT) -> str:
    response = requests.post(f"{server.url}/jobs", json={"prompt": prompt, "seed": seed, **size}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job(server: Imagine, job_id: str) -> dict:
    response = requests.get(f"{server.url}/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(server: Imagine, job_id: str, *statuses: str) -> dict:
    wait_until(lambda: job(server, job_id)["status"] in statuses, f"job {job_id} is {statuses}", 300)
    return job(server, job_id)


def wait_running(server: Imagine, job_id: str) -> dict:
    """The job once a server draws it, past its first step."""
    wait_until(lambda: job(server, job_id)["step"] >= 1, f"job {job_id} runs", 300)
    return job(server, job_id)


def followed(server: Imagine, job_id: str, into: list) -> threading.Thread:
    """Follows the job's events on `server` on a thread of its own, appending (id, event, data) to `into`."""

    def follow():
        with requests.get(f"{server.url}/jobs/{job_id}/events", stream=True, timeout=300) as response:
            into.extend(parse_events(response.iter_lines(decode_unicode=True)))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


# ---- one queue, any server


def test_a_job_submitted_to_one_server_is_followed_live_on_the_others_with_the_same_event_ids(fleet):
    submitter, *others = fleet
    job_id = submit(submitter, "followed elsewhere", 1, {**SHORT, "num_steps": 40})
    seen = {server.port: [] for server in others}
    threads = [followed(server, job_id, seen[server.port]) for server in others]
    for thread in threads:
        thread.join(timeout=300)
    first, second = seen.values()
    assert [(event_id, kind) for event_id, kind, _ in first] == [(event_id, kind) for event_id, kind, _ in second]
    assert [data["step"] for _, kind, data in first if kind == "progress"] == list(range(1, 41))
    assert first[-1][1] == "done" and first[-1][2]["attempts"] == 1
    drawer = next(server for server in fleet if first[-1][2]["server"].endswith(f":{server.port}"))
    assert job_id in drawer.drawn()
    assert any(server is not drawer for server in others)  # at least one of them followed it live from afar


def test_a_synchronous_generate_on_a_busy_server_is_drawn_by_another_and_a_job_is_cancelled_from_a_third(fleet):
    long_id = submit(fleet[0], "keeps one server busy", 2, LONG)
    busy = wait_running(fleet[0], long_id)["server"]
    busy_server = next(server for server in fleet if busy.endswith(f":{server.port}"))
    body = {"prompt": "drawn elsewhere", "seed": 3, **SHORT}
    answer = requests.post(f"{busy_server.url}/generate", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    listing = requests.get(f"{busy_server.url}/jobs", timeout=30).json()["jobs"]
    newest = listing[0]
    assert newest["status"] == "done" and newest["server"] != busy
    assert job(busy_server, newest["id"])["prompt"] == "drawn elsewhere"
    canceller = next(server for server in fleet if server is not busy_server)
    cancelled = requests.delete(f"{canceller.url}/jobs/{long_id}", timeout=30)
    assert cancelled.status_code == 202 and cancelled.json()["cancelling"]
    ended = wait_status(busy_server, long_id, "cancelled", "done", "failed")
    assert ended["status"] == "cancelled" and ended["error"] == f"cancelled by DELETE /jobs/{long_id}"
    assert ended["step"] < LONG["num_steps"]


def test_a_server_stopped_with_sigterm_hands_its_running_job_back_to_the_fleet(fleet):
    handed_back = submit(fleet[0], "handed back", 9, LONG)
    drawer = wait_running(fleet[0], handed_back)["server"]
    index = next(index for index, server in enumerate(fleet) if drawer.endswith(f":{server.port}"))
    fleet[index].process.send_signal(signal.SIGTERM)
    assert fleet[index].process.wait(timeout=120) == 0
    other = next(server for server in fleet if server is not fleet[index])
    ended = wait_status(other, handed_back, "done", "failed", "cancelled")
    assert ended["status"] == "done" and ended["attempts"] == 2 and ended["server"] != drawer
    replacement = Imagine(fleet[index].log.parent, "replacement", fleet[index].queue)  # the next tests want three
    replacement.wait_listening()
    fleet[index] = replacement


def test_health_reports_the_fleets_queue_beside_the_servers_own(fleet):
    def health():
        return requests.get(f"{fleet[0].url}/health", timeout=30).json()

    wait_until(lambda: health()["fleet"]["drawing"] == 0, "the jobs of the tests before have ended")  # heartbeats lag
    assert health()["fleet"] == {"reachable": True, "servers": 3, "waiting": 0, "drawing": 0}
    health = health()
    assert health["running"] is False
    progress = requests.get(f"{fleet[1].url}/sdapi/v1/progress", timeout=30).json()
    assert progress["fleet"]["servers"] == 3


def test_a_synchronous_client_that_leaves_cancels_its_job_on_the_server_drawing_it(fleet):
    body = {"prompt": "left early", "seed": 4, "stream": 1, **LONG}
    with requests.post(f"{fleet[0].url}/generate", json=body, stream=True, timeout=300) as answer:
        assert answer.status_code == 200
        next(answer.iter_lines())  # a first preview: it runs
    left = requests.get(f"{fleet[1].url}/jobs", timeout=30).json()["jobs"][0]
    ended = wait_status(fleet[1], left["id"], "cancelled", "done", "failed")
    assert ended["status"] == "cancelled" and ended["error"] == "the client disconnected"


def test_a_server_that_stalls_and_comes_back_after_its_job_was_drawn_again_writes_nothing_of_it(fleet):
    stalled_id = submit(fleet[0], "stalls", 8, LONG)
    drawer = wait_running(fleet[0], stalled_id)["server"]
    stalled = next(server for server in fleet if drawer.endswith(f":{server.port}"))
    stalled.process.send_signal(signal.SIGSTOP)
    try:
        other = next(server for server in fleet if server is not stalled)
        wait_until(lambda: job(other, stalled_id)["attempts"] == 2, "another server draws it again", 300)
    finally:
        stalled.process.send_signal(signal.SIGCONT)
    wait_until(lambda: "is drawn again by another server" in stalled.text(), "the stalled server stops it", 300)
    ended = wait_status(other, stalled_id, "done", "failed", "cancelled")
    assert ended["status"] == "done" and ended["attempts"] == 2 and ended["server"] != drawer
    events = requests.get(f"{stalled.url}/jobs/{stalled_id}/events", timeout=60).text
    assert events.count("event: done") == 1 and "event: cancelled" not in events


def test_three_servers_draw_twelve_jobs_between_them_and_a_killed_servers_job_is_finished_by_another(fleet):
    reference = requests.post(f"{fleet[0].url}/generate", json={"prompt": "the long one", "seed": 7, **LONG})
    assert reference.status_code == 200, reference.text
    ids = [submit(fleet[index % 3], f"job {index}", 100 + index) for index in range(6)]
    long_id = submit(fleet[1], "the long one", 7, LONG)
    ids += [submit(fleet[index % 3], f"job {index}", 100 + index) for index in range(6, 11)]
    killed = wait_running(fleet[2], long_id)["server"]
    victim = next(server for server in fleet if killed.endswith(f":{server.port}"))
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=30)
    survivor = next(server for server in fleet if server is not victim)
    finished = {job_id: wait_status(survivor, job_id, "done", "failed", "cancelled") for job_id in [*ids, long_id]}
    assert {fields["status"] for fields in finished.values()} == {"done"}
    assert finished[long_id]["attempts"] == 2 and finished[long_id]["server"] != killed
    assert pixels(finished[long_id]["img"]).tobytes() == pixels(reference.json()["img"]).tobytes()
    assert all(finished[job_id]["attempts"] == 1 for job_id in ids)
    ours = {*ids, long_id}  # the tests before drew jobs too
    draws = {server.port: [job_id for job_id in server.drawn() if job_id in ours] for server in fleet}
    assert sorted(sum(draws.values(), [])) == sorted([*ids, long_id, long_id])  # none twice but the killed one
    assert all(draws.values())  # each drew some


# ---- one server of a fleet in this process, on the tests' shared engine


@pytest.fixture
def joined(redis_server, engine):
    """Makes this process's shared engine a server of a fleet on a Redis of its own; it leaves the fleet after."""
    server = redis_server()
    fleets = []

    def join():
        fleets.append(Fleet(connect(server.url), engine, "in-process:1", server.url))
        return fleets[-1]

    yield join
    for fleet in fleets:
        fleet.stop()


def test_an_idle_server_draws_a_job_for_its_loaded_model_before_an_older_one_for_another_model(engine, joined):
    last_event(engine.submit(GenerationRequest(prompt="loads the demo", **FAST)))
    fleet = joined()
    older, _ = fleet.enqueue(engine.accept(GenerationRequest(prompt="another model", model="tiny", **FAST)))
    newer, _ = fleet.enqueue(engine.accept(GenerationRequest(prompt="the loaded model", **FAST)))
    fleet.start()
    status = lambda job_id: fleet.redis.hget(job_key(job_id), "status")  # noqa: E731
    wait_until(lambda: status(older) == status(newer) == "done", "both jobs are drawn")
    started = {job_id: float(fleet.redis.hget(job_key(job_id), "started")) for job_id in (older, newer)}
    assert started[newer] < started[older]


def test_a_server_whose_clock_runs_an_hour_ahead_expires_no_fleet_job_early(engine, joined):
    fleet = joined()
    fleet.start()
    store = FleetStore(fleet, clock=lambda: time.time() + 3600)  # past --job-ttl (600 s) by its own clock
    held = store.submit(GenerationRequest(prompt="kept its ttl", **FAST))
    held.wait_end(300)
    store.expire()
    again = store.get(held.id)
    assert again.status == "done" and again.result_fields(lambda finished: finished.seeds) == [FAST["seed"]]


def test_an_ended_jobs_keys_leave_redis_job_ttl_seconds_after_its_end_and_its_id_the_list(engine, joined, monkeypatch):
    monkeypatch.setattr(engine.settings, "job_ttl", 1)
    fleet = joined()
    fleet.start()
    job_id, _ = fleet.enqueue(engine.accept(GenerationRequest(prompt="short-lived", **FAST)))
    wait_until(lambda: fleet.redis.hget(job_key(job_id), "status") is not None, "the job is in Redis")
    gone = lambda: fleet.redis.keys(f"{job_key(job_id)}*") == [] and fleet.redis.zscore(JOBS, job_id) is None  # noqa: E731
    wait_until(gone, "the job's keys and its id are gone")
    assert fleet.redis.zcard(WAITING) == 0


# ---- Redis itself: unreachable, lost mid-run, with a password


def test_a_server_whose_redis_cannot_be_reached_at_start_exits_naming_the_url_without_its_password(tmp_path):
    port = free_port()
    server = Imagine(tmp_path, "alone", f"redis://:hunter2secret@127.0.0.1:{port}/0")
    assert server.process.wait(timeout=START_SECONDS) != 0
    text = server.text()
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (--queue, IMAGINE_QUEUE)" in text
    assert "hunter2secret" not in text


def test_the_password_comes_from_imagine_redis_password_and_never_shows_in_the_log(tmp_path, redis_server):
    secret = "hunter2-" + os.urandom(6).hex()
    server = redis_server("--requirepass", secret)
    wrong = Imagine(tmp_path, "wrong", server.url, {"IMAGINE_REDIS_PASSWORD": "not-" + secret})
    assert wrong.process.wait(timeout=START_SECONDS) != 0
    assert f"cannot reach Redis at {server.url}" in wrong.text()
    (right,) = start_servers(tmp_path, server.url, 1, {"IMAGINE_REDIS_PASSWORD": secret})
    try:
        answer = requests.post(f"{right.url}/generate", json={"prompt": "a key", "seed": 1, **SHORT}, timeout=300)
        assert answer.status_code == 200, answer.text
    finally:
        right.stop()
    assert secret not in wrong.text() + right.text()


def test_while_redis_is_away_new_jobs_get_503_the_running_one_finishes_and_all_is_there_once_it_is_back(
    tmp_path, redis_server
):
    server = redis_server("--appendonly", "yes", "--appendfsync", "always")  # what is accepted survives its restart
    (imagine_server,) = start_servers(tmp_path, server.url, 1)
    try:
        running = submit(imagine_server, "through the outage", 5, LONG)
        wait_running(imagine_server, running)
        server.stop()
        refused = requests.post(f"{imagine_server.url}/jobs", json={"prompt": "too soon", **SHORT}, timeout=60)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "cannot be reached" in refused.json()["error"]
        health = requests.get(f"{imagine_server.url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["fleet"] == {"reachable": False}
        wait_until(lambda: "generated in" in imagine_server.text(), "the running job finished", 300)
        server.start()
        after = submit(imagine_server, "after the outage", 6)
        assert wait_status(imagine_server, running, "done", "failed", "cancelled")["status"] == "done"
        assert wait_status(imagine_server, after, "done", "failed", "cancelled")["status"] == "done"
        assert job(imagine_server, running)["attempts"] == 1
    finally:
        imagine_server.stop()
