"""Jobs that outlive the process (issue 37): kept in the state folder (--state-dir) before their 202, taken back by
the next server on it: queued ones run in their order, one that was running is drawn again with the same seeds up to
--job-attempts, finished ones keep their pictures until their TTL, and event streams count on across the restart.
What can go wrong around the folder: a damaged or locked database, a second server, a full disk, a clock that jumps.
On the tiny demo model; a server's crash in process is its ledger closed (nothing more written, its lock let go), and
once for real: kill -9 of a server with six jobs."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import FAST, assert_same_picture, free_port, pixels, read_log_until_listening, wait_until
from jobs_client import events, job, stream, submit, wait_for

import imagine
from engine import job_ledger
from engine.errors import ImagineError
from engine.held_jobs import JobStore
from engine.job_ledger import DATABASE, FolderUnusable, JobLedger
from engine.request import parse_request

ROOT = Path(imagine.__file__).resolve().parent


def server(make_engine, state_dir: Path, **settings):
    """A test client for an app on a fresh engine that keeps its jobs in `state_dir`, as a server started on it."""
    engine = make_engine(model="demo", state_dir=state_dir, **settings)
    return imagine.create_app(engine).test_client()


def crash(client) -> None:
    """The server's process gone, as far as its state folder can tell: nothing more written, its lock let go."""
    client.application.extensions["imagine.jobs"].ledger.close()


def kept_rows(state_dir: Path) -> list:
    """The jobs the state folder's database holds, read as another program would."""
    with sqlite3.connect(state_dir / DATABASE) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY seq")]


def wait_kept(state_dir: Path, job_id: str, status: str) -> None:
    """Waits until the state folder holds the job as `status`: a job shows done as its pictures are being written."""

    def kept() -> bool:
        return any(row["id"] == job_id and row["status"] == status for row in kept_rows(state_dir))

    wait_until(kept, f"job {job_id} is kept as {status}")


def left_by_a_server(state_dir: Path, *jobs: tuple) -> list:
    """Writes jobs into the state folder as a server that died would have left them: (body, status, attempts) each;
    returns their ids."""
    ledger = JobLedger(state_dir)
    ids = []
    for index, (body, status, attempts) in enumerate(jobs):
        ids.append(f"{index:032x}")
        ledger.add(ids[-1], parse_request({"prompt": "kept", **FAST, **body}), time.time())
        ledger.update(ids[-1], status=status, attempts=attempts)
    ledger.close()
    return ids


# ---- kept before the 202, taken back after a restart


def test_a_job_is_in_the_state_folder_with_its_drawn_seed_when_its_202_is_answered(make_engine, state_dir, hold):
    held = hold(1)
    client = server(make_engine, state_dir, generate=held.generate)
    first, second = submit(client, seed=None), submit(client, seed=None)
    [running, queued] = kept_rows(state_dir)
    assert (running["id"], queued["id"]) == (first["id"], second["id"]) and queued["status"] == "queued"
    seed = json.loads(queued["request"])["seed"]
    held.release()
    assert wait_for(client, second["id"], "done")["seed"] == seed


def test_queued_jobs_run_in_their_order_after_a_restart_and_one_running_is_drawn_again_with_its_seed(
    make_engine, state_dir, client
):
    ids = left_by_a_server(
        state_dir, ({"seed": 5}, "running", 1), ({"seed": 6}, "queued", 0), ({"seed": 7, "n": 2}, "queued", 0)
    )
    restarted = server(make_engine, state_dir)
    done = [wait_for(restarted, job_id, "done") for job_id in ids]
    assert [each["seeds"] for each in done] == [[5], [6], [7, 8]]
    assert [each["created"] for each in done] == sorted(each["created"] for each in done)
    assert [each["started"] for each in done] == sorted(each["started"] for each in done)  # in their order
    drawn = client.post("/generate", json={"prompt": "kept", **FAST, "seed": 5}).get_json()
    assert_same_picture(pixels(done[0]["img"]), pixels(drawn["img"]))


def test_a_job_the_server_stopped_under_job_attempts_times_fails_saying_so(make_engine, state_dir):
    [twice, once] = left_by_a_server(state_dir, ({}, "running", 2), ({"seed": 3}, "running", 1))
    restarted = server(make_engine, state_dir, job_attempts=2)
    failed = job(restarted, twice)
    assert failed["status"] == "failed"
    assert failed["error"] == "the server stopped 2 times while drawing it (--job-attempts 2)"
    assert wait_for(restarted, once, "done")["seed"] == 3  # its second attempt
    wait_kept(state_dir, once, "done")
    assert [row["status"] for row in kept_rows(state_dir)] == ["failed", "done"]


def test_a_stream_picks_up_across_a_restart_after_the_last_event_id_it_saw(make_engine, state_dir, hold):
    held = hold(2)
    before = server(make_engine, state_dir, generate=held.generate)
    job_id = submit(before, num_steps=4)["id"]
    held.reached(2)
    with stream(before, job_id) as response:
        seen = next(events(response))  # the first step's progress
    assert seen[:2] == (1, "progress")
    crash(before)
    after = server(make_engine, state_dir)
    received = list(events(stream(after, job_id, last_id=seen[0])))
    assert [(kind, data.get("step")) for _, kind, data in received] == [
        ("progress", 1), ("progress", 2), ("progress", 3), ("progress", 4), ("done", 4)
    ]  # fmt: skip
    # Counted on after what it saw, past one id the server may have sent and not written as it died.
    assert [record_id for record_id, _, _ in received] == [3, 4, 5, 6, 7]
    assert received[-1][2]["img"]
    with stream(after, job_id, last_id=2) as response:
        assert response.status_code == 200  # that one id is one it may have sent
    assert stream(after, job_id, last_id=7).status_code == 204  # it has seen the end


def test_jobs_stopped_by_sigterm_are_queued_again_and_run_when_the_server_starts(make_engine, state_dir, hold):
    held = hold(2)
    before = server(make_engine, state_dir, generate=held.generate)
    ids = [submit(before, seed=seed)["id"] for seed in (1, 2)]
    held.reached(2)
    before.application.extensions["imagine.engine"].stop()  # what SIGTERM does
    held.release()  # the running job reaches its next step, where it stops
    wait_until(lambda: [row["status"] for row in kept_rows(state_dir)] == ["queued", "queued"], "both are queued")
    assert [row["attempts"] for row in kept_rows(state_dir)] == [0, 0]  # a stop on purpose costs no attempt
    crash(before)
    after = server(make_engine, state_dir, job_attempts=1)
    assert [wait_for(after, job_id, "done")["seed"] for job_id in ids] == [1, 2]


# ---- kept until the TTL, and no earlier whatever the clock does


def test_a_finished_jobs_pictures_survive_a_restart_then_go_with_its_files_after_the_ttl(make_engine, state_dir):
    before = server(make_engine, state_dir, job_ttl=60)
    job_id = submit(before, n=2)["id"]
    drawn = wait_for(before, job_id, "done")
    wait_kept(state_dir, job_id, "done")
    crash(before)
    now = [time.time()]
    after = restarted_with_clock(make_engine, state_dir, now)
    kept = job(after, job_id)
    assert (kept["images"], kept["seeds"], kept["finished"]) == (drawn["images"], drawn["seeds"], drawn["finished"])
    assert (state_dir / "jobs" / job_id / "picture-1.png").is_file()
    now[0] += 60
    assert after.get(f"/jobs/{job_id}").status_code == 404
    assert kept_rows(state_dir) == [] and not (state_dir / "jobs" / job_id).exists()


def test_a_job_pushed_out_past_max_jobs_leaves_no_row_or_picture_behind(make_engine, state_dir):
    client = server(make_engine, state_dir, max_jobs=1)
    first = submit(client, seed=1)["id"]
    wait_for(client, first, "done")  # and collected: nothing left to collect, it goes first
    wait_kept(state_dir, first, "done")
    second = submit(client, seed=2)["id"]
    wait_for(client, second, "done")
    wait_until(lambda: [row["id"] for row in kept_rows(state_dir)] == [second], "the first job's row is gone")
    assert not (state_dir / "jobs" / first).exists() and client.get(f"/jobs/{first}").status_code == 404


def restarted_with_clock(make_engine, state_dir: Path, now: list):
    """A server started on `state_dir` whose wall clock and monotonic clock are both `now[0]`, for the test to move."""
    engine = make_engine(model="demo", state_dir=state_dir, job_ttl=60)
    app = imagine.create_app(engine)
    crash(app.test_client())  # the app's own store gives the folder up to the one on the test's clock
    store = JobStore(engine, clock=lambda: now[0], ledger=JobLedger(state_dir), ticks=lambda: now[0])
    app.extensions["imagine.jobs"] = store
    return app.test_client()


def test_a_wall_clock_set_back_or_forward_expires_no_job_early(make_engine, state_dir):
    before = server(make_engine, state_dir, job_ttl=60)
    job_id = submit(before)["id"]
    finished = wait_for(before, job_id, "done")["finished"]
    wait_kept(state_dir, job_id, "done")
    crash(before)
    wall, tick = [finished - 3600], [0.0]  # the next start's clock an hour behind (a machine that kept a stale time)
    engine = make_engine(model="demo", state_dir=state_dir, job_ttl=60)
    after = JobStore(engine, clock=lambda: wall[0], ledger=JobLedger(state_dir), ticks=lambda: tick[0])
    wall[0] += 86_400  # then set a day forward
    tick[0] += 59
    assert after.get(job_id).status == "done"
    tick[0] += 1
    with pytest.raises(ImagineError):
        after.get(job_id)


# ---- what can go wrong around the state folder


def test_a_damaged_database_is_kept_aside_and_the_server_starts_with_a_fresh_one(make_engine, state_dir, caplog):
    (state_dir / DATABASE).write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    client = server(make_engine, state_dir)
    assert wait_for(client, submit(client)["id"], "done")["img"]
    [aside] = state_dir.glob(f"{DATABASE}.bad-*[0-9]")
    assert aside.read_bytes().startswith(b"SQLite format 3")
    assert f"moved it aside to {aside}" in caplog.text and "cannot be read" in caplog.text


def test_a_database_another_program_holds_locked_is_kept_aside_and_the_server_starts(make_engine, state_dir, caplog):
    left_by_a_server(state_dir, ({}, "queued", 0))
    other = sqlite3.connect(state_dir / DATABASE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        client = server(make_engine, state_dir)
        assert wait_for(client, submit(client)["id"], "done")["img"]
    finally:
        other.close()
    assert "is locked by another program: moved it aside" in caplog.text
    assert len(list(state_dir.glob(f"{DATABASE}.bad-*[0-9]"))) == 1 and len(kept_rows(state_dir)) == 1


def test_a_second_server_on_the_same_state_folder_is_refused_naming_it_and_the_owner(state_dir, tmp_path):
    owner = JobLedger(state_dir)
    try:
        command = [sys.executable, str(ROOT / "imagine.py"), "--model", "demo", "-d", "cpu", "--port", str(free_port())]
        command += ["--models-dir", str(tmp_path), "--state-dir", str(state_dir)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        owner.close()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"imagine: the state folder {state_dir} (--state-dir, IMAGINE_STATE_DIR) is in use by another Imagine server "
        f"(process {os.getpid()}): one server keeps its jobs there at a time; stop that one, or give this one a state "
        "folder of its own with --state-dir"
    )


def test_a_state_folder_that_cannot_be_made_stops_the_start_naming_it(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(FolderUnusable) as refused:
        JobLedger(blocked)
    assert str(refused.value) == (
        f"imagine: cannot use the state folder {blocked} (--state-dir, IMAGINE_STATE_DIR): Not a directory"
    )


def test_a_disk_without_room_refuses_a_job_with_507_before_any_work_keeping_nothing(
    make_engine, state_dir, monkeypatch
):
    client = server(make_engine, state_dir)
    accepted = submit(client)["id"]
    usage = job_ledger.shutil.disk_usage(state_dir)
    monkeypatch.setattr(job_ledger.shutil, "disk_usage", lambda path: usage._replace(free=10_000_000))
    refused = client.post("/jobs", json={"prompt": "no room", **FAST})
    assert refused.status_code == 507
    assert "has no room for another job: 10 MB free there" in refused.get_json()["error"]
    assert [row["id"] for row in kept_rows(state_dir)] == [accepted]
    assert client.post("/generate", json={"prompt": "no room", **FAST}).status_code == 200  # nothing kept: it draws
    assert wait_for(client, accepted, "done")["img"]


def test_a_database_that_cannot_grow_refuses_a_job_with_507_and_loses_none_accepted(make_engine, state_dir):
    client = server(make_engine, state_dir)
    accepted = submit(client)["id"]
    ledger = client.application.extensions["imagine.jobs"].ledger
    pages = ledger.db.execute("PRAGMA page_count").fetchone()[0]
    ledger.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"
    refused = client.post("/jobs", json={"prompt": "no room " * 1500, **FAST})
    assert refused.status_code == 507 and "it is full" in refused.get_json()["error"]
    assert [row["id"] for row in kept_rows(state_dir)] == [accepted]
    assert sorted(path.name for path in (state_dir / "jobs").iterdir()) == [accepted]
    assert wait_for(client, accepted, "done")["img"]


def test_the_state_folder_and_attempts_come_from_flags_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("IMAGINE_STATE_DIR")
    monkeypatch.delenv("IMAGINE_JOB_ATTEMPTS", raising=False)
    defaults = imagine.parse_settings([])
    assert (defaults.state_dir, defaults.job_attempts) == (Path("~/.imagine").expanduser(), 2)
    assert imagine.Settings().state_dir is None  # an engine that no server runs (the CLI drawing alone) keeps none
    flags = imagine.parse_settings(["--state-dir", str(tmp_path), "--job-attempts", "3"])
    assert (flags.state_dir, flags.job_attempts) == (tmp_path, 3)
    monkeypatch.setenv("IMAGINE_STATE_DIR", "~/jobs")
    monkeypatch.setenv("IMAGINE_JOB_ATTEMPTS", "1")
    assert (imagine.parse_settings([]).state_dir, imagine.parse_settings([]).job_attempts) == (
        Path("~/jobs").expanduser(), 1
    )  # fmt: skip
    with pytest.raises(SystemExit):
        imagine.parse_settings(["--job-attempts", "0"])


# ---- the real thing


def start(port: int, state_dir: Path, models_dir: Path):
    command = [
        sys.executable,
        str(ROOT / "imagine.py"),
        "--model",
        "demo",
        "--models-dir",
        str(models_dir),
        "-d",
        "cpu",
    ]
    command += ["--port", str(port), "--state-dir", str(state_dir)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    read_log_until_listening(process)
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process


def test_six_jobs_of_a_server_killed_with_sigkill_all_finish_after_its_restart_with_their_pictures(
    state_dir, tmp_path, client
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bodies = [{"prompt": "a long one", "width": 128, "height": 128, "num_steps": 20, "seed": 100}]
    bodies += [{"prompt": f"queued {seed}", **FAST, "seed": seed} for seed in range(5)]
    process = start(port, state_dir, tmp_path)
    try:
        ids = [requests.post(f"{url}/jobs", json=body, timeout=60).json()["id"] for body in bodies]
        wait_until(lambda: running(url) == ids[:1], "the first job runs")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process = start(port, state_dir, tmp_path)
        done = [wait_for_done(url, job_id) for job_id in ids]
    finally:
        process.kill()
        process.wait(timeout=30)
    assert [each["status"] for each in done] == ["done"] * 6
    assert [row["attempts"] for row in kept_rows(state_dir)] == [2, 1, 1, 1, 1, 1]  # the first was drawn again
    for body, finished in zip(bodies, done, strict=True):
        undisturbed = client.post("/generate", json=body).get_json()  # this process's own server, never stopped
        assert_same_picture(pixels(finished["img"]), pixels(undisturbed["img"]))


def running(url: str) -> list:
    listing = requests.get(f"{url}/jobs", timeout=30).json()["jobs"]
    return [each["id"] for each in listing if each["status"] == "running"]


def wait_for_done(url: str, job_id: str) -> dict:
    answer = {}

    def ended() -> bool:
        answer.update(requests.get(f"{url}/jobs/{job_id}", timeout=30).json())
        return answer["status"] in ("done", "failed", "cancelled")

    wait_until(ended, f"job {job_id} ends", timeout=300)
    return answer
