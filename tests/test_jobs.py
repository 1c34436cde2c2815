"""Jobs (POST /jobs): submitted at once, polled, followed as Server-Sent Events that a client picks up where it left
them, cancelled, kept for --job-ttl seconds and at most --max-jobs; on the tiny demo model."""

import gc
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import FAST, free_port, pixels, read_log_until_listening, wait_until
from jobs_client import events, job, parse_events, stream, submit, wait_for
from PIL import Image

import imagine
from engine.held_jobs import HeldJob, JobStore

ROOT = Path(imagine.__file__).resolve().parent
CLI = ROOT / "imagine-cli.py"
DOC_EXAMPLES = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "jobs.md").read_text(), re.S)


def read_to_end(response) -> list:
    with response:
        return list(events(response))


# ---- submit, poll, collect


def test_a_job_answers_202_at_once_then_holds_the_same_picture_as_generate(client):
    submitted = client.post("/jobs", json={"prompt": "a lighthouse", **FAST})
    assert submitted.status_code == 202
    answer = submitted.get_json()
    assert re.fullmatch(r"[0-9a-f]{32}", answer["id"])  # 128 random bits
    assert answer["url"] == submitted.headers["Location"] == f"/jobs/{answer['id']}"
    assert answer["events"] == f"/jobs/{answer['id']}/events"
    assert answer["status"] in ("queued", "running")

    done = wait_for(client, answer["id"], "done")
    expected = client.post("/generate", json={"prompt": "a lighthouse", **FAST}).get_json()
    assert np.array_equal(pixels(done["img"]), pixels(expected["img"]))
    for field in ("images", "seeds", "seed", "model", "width", "height", "steps"):
        assert done[field] == expected[field], field
    assert done["step"] == done["steps"] == 4
    assert done["created"] <= done["started"] <= done["finished"]
    assert done["seconds"] > 0 and "error" not in done and "position" not in done
    assert submit(client)["id"] != answer["id"]


@pytest.mark.parametrize(
    "body",
    [{"prompt": "x", "num_steps": 0}, {"prompt": 5}, {"prompt": "x", "model": "no-such-model"}, [1, 2], "not json"],
)
def test_a_bad_body_is_refused_as_generate_refuses_it_before_anything_is_queued(client, body):
    send = {"data": body, "content_type": "application/json"} if isinstance(body, str) else {"json": body}
    refused = client.post("/jobs", **send)
    generate = client.post("/generate", **send)
    assert (refused.status_code, refused.get_json()) == (generate.status_code, generate.get_json())
    assert refused.status_code in (400, 404)
    assert client.get("/jobs").get_json() == {"jobs": []}


def test_a_full_queue_is_the_same_503_with_retry_after_as_generate(make_engine, hold):
    held = hold(1)
    engine = make_engine(model="demo", max_queue=0, generate=held.generate)
    client = imagine.create_app(engine).test_client()
    running = submit(client)
    wait_until(lambda: held.steps, "the first job runs")
    refused, generate = client.post("/jobs", json={"prompt": "x"}), client.post("/generate", json={"prompt": "x"})
    assert refused.status_code == generate.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json() == generate.get_json()
    held.release()
    assert wait_for(client, running["id"], "done")["img"]


def test_a_queued_job_tells_its_position_and_health_counts_it(make_engine, hold):
    held = hold(1)
    engine = make_engine(model="demo", max_queue=2, generate=held.generate)
    client = imagine.create_app(engine).test_client()
    first = submit(client)
    wait_until(lambda: held.steps, "the first job runs")
    second, third = submit(client), submit(client)
    assert job(client, first["id"])["status"] == "running" and "position" not in job(client, first["id"])
    assert (second["status"], second["position"], third["position"]) == ("queued", 0, 1)
    assert client.get("/health").get_json()["queue"] == 2
    assert client.get("/sdapi/v1/progress").get_json()["state"]["job"] == "txt2img"  # the running job
    held.release()
    for each in (first, second, third):
        assert wait_for(client, each["id"], "done")["img"]


def test_get_jobs_lists_the_held_jobs_newest_first(client):
    ids = [submit(client, seed=seed)["id"] for seed in (1, 2, 3)]
    wait_for(client, ids[-1], "done")
    listed = client.get("/jobs").get_json()["jobs"]
    assert [each["id"] for each in listed] == ids[::-1]
    assert [each["status"] for each in listed] == ["done"] * 3
    assert listed[0]["created"] >= listed[-1]["created"]


def test_preview_1_adds_the_latest_preview_from_the_step_after_the_first_ask(make_engine, hold):
    held = hold(2)
    engine = make_engine(model="demo", generate=held.generate)
    client = imagine.create_app(engine).test_client()
    submitted = submit(client)
    held.reached(2)
    asked = job(client, submitted["id"], "?preview=1")  # before it, nobody had asked for a preview
    assert asked["status"] == "running" and asked["step"] == 1 and asked["preview"] is None
    held.stop_at(3)
    held.release(2)
    held.reached(3)
    running = job(client, submitted["id"], "?preview=1")
    assert running["step"] == 2 and pixels(running["preview"]).shape == (64, 64, 3)
    assert "preview" not in job(client, submitted["id"])
    held.release()
    wait_for(client, submitted["id"], "done")
    assert job(client, submitted["id"], "?preview=1")["preview"] is None


# ---- events


def test_events_stream_every_step_previews_every_n_steps_then_done(client):
    submitted = submit(client, num_steps=6)
    response = stream(client, submitted["id"], "?every=2")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    got = read_to_end(response)
    ids = [event_id for event_id, _, _ in got]
    assert ids == sorted(set(ids))  # every event has its own id, counting up
    progress = [data["step"] for _, kind, data in got if kind == "progress"]
    assert progress == [1, 2, 3, 4, 5, 6]
    previews = [data for _, kind, data in got if kind == "preview"]
    assert previews, "no preview was sent"
    for preview in previews:
        assert preview["step"] < 6 and pixels(preview["img"]).shape == (64, 64, 3)
    last_id, kind, data = got[-1]
    assert kind == "done" and data["status"] == "done" and data["img"]
    assert np.array_equal(pixels(data["img"]), pixels(job(client, submitted["id"])["img"]))


def test_without_every_the_stream_has_no_previews(client):
    kinds = {kind for _, kind, _ in read_to_end(stream(client, submit(client)["id"]))}
    assert kinds == {"progress", "done"}


def test_a_client_that_reconnects_with_last_event_id_gets_what_it_missed_then_the_live_events(make_engine, hold):
    held = hold(3)
    engine = make_engine(model="demo", generate=held.generate)
    client = imagine.create_app(engine).test_client()
    submitted = submit(client, num_steps=6)
    first = stream(client, submitted["id"])
    seen = []
    for event in events(first):
        seen.append(event)
        if event[2]["step"] == 1:
            break
    first.close()  # the client leaves after step 1
    wait_until(lambda: held.steps == [1, 2, 3], "the job went on to step 3 with no client watching")
    again = stream(client, submitted["id"], "?every=1", last_id=seen[-1][0])
    held.release()
    rest = read_to_end(again)
    assert all(event_id > seen[-1][0] for event_id, _, _ in rest)
    assert [data["step"] for _, kind, data in rest if kind == "progress"] == [2, 3, 4, 5, 6]  # missed, then live
    assert rest[-1][1] == "done"
    assert job(client, submitted["id"])["status"] == "done"  # leaving the first stream did not cancel it
    # A client that has seen the end is told 204: EventSource then stops reconnecting.
    assert stream(client, submitted["id"], last_id=rest[-1][0]).status_code == 204
    assert [kind for _, kind, _ in read_to_end(stream(client, submitted["id"], last_id=rest[-2][0]))] == ["done"]


def test_leaving_the_event_stream_of_a_real_server_does_not_cancel_the_job(make_engine, serve, hold):
    held = hold(2)
    engine = make_engine(model="demo", generate=held.generate)
    url = serve(engine)
    answer = requests.post(f"{url}/jobs", json={"prompt": "x", **FAST}, timeout=30).json()
    with requests.get(f"{url}/jobs/{answer['id']}/events", stream=True, timeout=30) as response:
        first = next(parse_events(response.iter_lines(decode_unicode=True)))
    assert first[1:] == ("progress", {"step": 1, "steps": 4})
    held.release()  # the connection is closed: a /generate client leaving here would cancel its picture
    wait_until(lambda: requests.get(f"{url}/jobs/{answer['id']}", timeout=30).json()["status"] != "running", "it ends")
    assert requests.get(f"{url}/jobs/{answer['id']}", timeout=30).json()["status"] == "done"
    assert held.steps == [1, 2, 3, 4]


def test_event_streams_past_the_servers_threads_for_them_are_503_and_a_closed_one_frees_its_place(make_engine):
    engine = make_engine(model="demo", max_queue=0)  # one job at a time: one event stream
    client = imagine.create_app(engine).test_client()
    submitted = submit(client)
    first = stream(client, submitted["id"])
    refused = stream(client, submitted["id"])
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "GET /jobs/<id>" in refused.get_json()["error"]
    first.close()
    assert read_to_end(stream(client, submitted["id"]))[-1][1] == "done"


# ---- cancel


def test_delete_cancels_a_queued_job_at_once_and_frees_its_place_in_the_queue(make_engine, hold):
    held = hold(1)
    engine = make_engine(model="demo", max_queue=1, generate=held.generate)
    client = imagine.create_app(engine).test_client()
    running = submit(client)
    wait_until(lambda: held.steps, "the first job runs")
    queued = submit(client)
    assert client.post("/jobs", json={"prompt": "x"}).status_code == 503
    cancelled = client.delete(f"/jobs/{queued['id']}")
    assert cancelled.status_code == 200
    assert cancelled.get_json()["status"] == "cancelled"
    assert cancelled.get_json()["error"] == f"cancelled by DELETE /jobs/{queued['id']}"
    assert client.get("/health").get_json()["queue"] == 0
    [(_, kind, data)] = read_to_end(stream(client, queued["id"]))
    assert (kind, data["status"]) == ("cancelled", "cancelled")
    later = submit(client)  # the cancelled job's place is free
    held.release()
    assert wait_for(client, later["id"], "done")["img"] and job(client, running["id"])["status"] == "done"


def test_delete_of_a_running_job_answers_at_once_and_the_job_stops_before_its_next_step(make_engine, hold):
    held = hold(2)
    engine = make_engine(model="demo", generate=held.generate)
    client = imagine.create_app(engine).test_client()
    submitted = submit(client, num_steps=150)
    watcher = stream(client, submitted["id"])
    wait_until(lambda: held.steps == [1, 2], "the job is held at step 2")
    answer = client.delete(f"/jobs/{submitted['id']}")  # the engine is held: an answer that waited would not come
    assert answer.status_code == 202
    assert answer.get_json() | {"status": "running", "cancelling": True} == answer.get_json()
    held.release()
    got = read_to_end(watcher)
    assert got[-1][1] == "cancelled" and got[-1][2]["error"].startswith("cancelled by DELETE")
    assert held.steps == [1, 2]


def test_delete_of_an_ended_job_is_409_with_its_status(client):
    submitted = submit(client)
    wait_for(client, submitted["id"], "done")
    refused = client.delete(f"/jobs/{submitted['id']}")
    assert refused.status_code == 409
    assert refused.get_json()["status"] == "done"
    assert "already ended" in refused.get_json()["error"]
    assert job(client, submitted["id"])["status"] == "done"  # still there to collect


# ---- kept, bounded


def test_a_finished_job_is_kept_for_the_ttl_then_answers_as_an_unknown_id_does(make_engine):
    now = [1000.0]
    engine = make_engine(model="demo", job_ttl=10)
    app = imagine.create_app(engine)
    app.extensions["imagine.jobs"] = JobStore(engine, clock=lambda: now[0], ticks=lambda: now[0])
    client = app.test_client()
    submitted = submit(client)
    wait_for(client, submitted["id"], "done")
    now[0] += 9.5
    assert job(client, submitted["id"])["img"]
    now[0] += 1
    expired, unknown = client.get(f"/jobs/{submitted['id']}"), client.get(f"/jobs/{'0' * 32}")
    assert expired.status_code == unknown.status_code == 404
    assert expired.get_json()["error"].replace(submitted["id"], "0" * 32) == unknown.get_json()["error"]
    assert client.get("/jobs").get_json() == {"jobs": []}


def test_past_max_jobs_the_oldest_finished_job_goes_first_and_an_unfinished_one_never(make_engine, hold):
    held = hold()
    engine = make_engine(model="demo", max_jobs=2, generate=held.generate)
    client = imagine.create_app(engine).test_client()
    finished = []
    for seed in (1, 2, 3):
        finished.append(submit(client, seed=seed)["id"])
        wait_for(client, finished[-1], "done")
    held.stop_at(1)
    running = submit(client)["id"]
    wait_until(lambda: held.steps, "the fourth job runs")
    assert [each["id"] for each in client.get("/jobs").get_json()["jobs"]] == [running, finished[2], finished[1]]
    assert client.get(f"/jobs/{finished[0]}").status_code == 404
    held.release()
    wait_for(client, running, "done")
    assert [each["id"] for each in client.get("/jobs").get_json()["jobs"]] == [running, finished[2]]


def test_an_expired_jobs_pictures_are_freed_without_any_request(make_engine):
    engine = make_engine(model="demo", job_ttl=1)
    app = imagine.create_app(engine)
    client = app.test_client()
    wait_for(client, submit(client)["id"], "done")
    store = app.extensions["imagine.jobs"]
    wait_until(lambda: not store.held, "the sweeper dropped the expired job")


def test_ten_thousand_posts_in_a_row_are_503s_and_hold_nothing(make_engine, hold, caplog):
    caplog.set_level(logging.ERROR, logger="imagine")  # 10,000 access-log lines would be memory of their own
    held = hold(1)
    engine = make_engine(model="demo", max_queue=1, generate=held.generate)
    app = imagine.create_app(engine)
    client = app.test_client()
    statuses = [client.post("/jobs", json={"prompt": "x", **FAST}).status_code for _ in range(2)]
    wait_until(lambda: held.steps, "the first job runs")
    alive = held_jobs_alive()
    statuses += [client.post("/jobs", json={"prompt": "x", **FAST}).status_code for _ in range(10_000)]
    assert statuses.count(202) == 2 and statuses.count(503) == 10_000
    assert len(app.extensions["imagine.jobs"].held) == 2
    assert held_jobs_alive() == alive  # a refused job is kept nowhere
    held.release()


def held_jobs_alive() -> int:
    gc.collect()
    return sum(isinstance(each, HeldJob) for each in gc.get_objects())


def test_the_ttl_and_the_cap_come_from_flags_or_the_environment(monkeypatch, capsys):
    monkeypatch.delenv("IMAGINE_JOB_TTL", raising=False)
    monkeypatch.delenv("IMAGINE_MAX_JOBS", raising=False)
    defaults = imagine.parse_settings([])
    assert (defaults.job_ttl, defaults.max_jobs) == (600, 64)
    flags = imagine.parse_settings(["--job-ttl", "30", "--max-jobs", "5"])
    assert (flags.job_ttl, flags.max_jobs) == (30, 5)
    monkeypatch.setenv("IMAGINE_JOB_TTL", "45")
    monkeypatch.setenv("IMAGINE_MAX_JOBS", "7")
    assert (imagine.parse_settings([]).job_ttl, imagine.parse_settings([]).max_jobs) == (45, 7)
    for flag in ("--job-ttl", "--max-jobs"):
        with pytest.raises(SystemExit):
            imagine.parse_settings([flag, "0"])
        assert f"{flag} must be at least 1" in capsys.readouterr().err


# ---- bad input


@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "x" * 5000, "%00", "..", "jobs"])
def test_an_unknown_or_malformed_id_is_a_json_404(client, job_id):
    for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        response = client.open(f"/jobs/{job_id}{path}", method=method)
        assert response.status_code == 404, (method, path)
        assert "error" in response.get_json() and "Traceback" not in response.get_data(as_text=True)
        assert len(response.get_json()["error"]) < 200


@pytest.mark.parametrize("every", ["0", "-1", "x", "1.5", "", "151", "9" * 40])
def test_a_bad_every_is_a_400_naming_it(client, every):
    response = client.get(f"/jobs/{submit(client)['id']}/events?every={every}")
    assert response.status_code == 400
    assert response.get_json()["error"].startswith("every must be a whole number from 1 to 150")


@pytest.mark.parametrize("last_id", ["abc", "-1", "1e3", "9" * 30, "999"])
def test_a_garbage_last_event_id_is_a_400_naming_it(client, last_id):
    submitted = submit(client)
    wait_for(client, submitted["id"], "done")
    response = stream(client, submitted["id"], last_id=last_id)
    assert response.status_code == 400
    assert "Last-Event-ID" in response.get_json()["error"]


def test_a_bad_preview_switch_is_a_400_naming_it(client):
    response = client.get(f"/jobs/{submit(client)['id']}?preview=maybe")
    assert response.status_code == 400
    assert response.get_json()["error"] == "preview must be 1 or 0, not 'maybe'"


def test_a_job_whose_model_fails_to_load_fails_with_the_reason_and_the_server_keeps_serving(make_engine, tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"half a download")
    engine = make_engine(model="demo", models_dir=tmp_path)
    client = imagine.create_app(engine).test_client()
    failed = wait_for(client, submit(client, model="broken")["id"], "failed")
    assert failed["error"] == "the model file cannot be read as a checkpoint (SafetensorError)"
    assert "img" not in failed
    [(_, kind, data)] = read_to_end(stream(client, failed["id"]))
    assert (kind, data["error"]) == ("failed", failed["error"])
    assert wait_for(client, submit(client)["id"], "done")["img"]


def test_sigterm_with_jobs_queued_ends_them_cancelled_and_tells_their_streams(tmp_path):
    port = free_port()
    command = [sys.executable, str(ROOT / "imagine.py"), "--model", "demo", "--models-dir", str(tmp_path)]
    process = subprocess.Popen([*command, "--port", str(port), "-d", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        read_log_until_listening(process)
        threading.Thread(target=process.stderr.read, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        long = {"prompt": "x", "width": 256, "height": 256, "num_steps": 150, "seed": 1}
        ids = [requests.post(f"{url}/jobs", json=long, timeout=30).json()["id"] for _ in range(3)]
        streams = [requests.get(f"{url}/jobs/{job_id}/events", stream=True, timeout=60) for job_id in ids]
        lines = parse_events(streams[0].iter_lines(decode_unicode=True))
        assert next(lines)[1] == "progress"  # the first job runs; the two others wait
        process.send_signal(signal.SIGTERM)
        ends = [list(parse_events(each.iter_lines(decode_unicode=True)))[-1] for each in streams[1:]]
        ends.insert(0, list(lines)[-1])
        for _, kind, data in ends:
            assert (kind, data["status"], data["error"]) == ("cancelled", "cancelled", "the server is shutting down")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- the CLI


def run_cli(*args, cwd, server):
    env = {"PATH": "/usr/bin:/bin", "IMAGINE_SERVER": server}
    return subprocess.run(
        [sys.executable, str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_detach_prints_the_job_id_and_job_saves_it_as_a_run_would(live_server, client, tmp_path):
    detached = run_cli("a", "red", "fox", "-w", "64", "-h", "64", "-n", "4", "--seed", "42", "--detach",
                       cwd=tmp_path, server=live_server)  # fmt: skip
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert f"imagine --job {job_id}" in detached.stderr
    assert list(tmp_path.iterdir()) == []

    waited = run_cli("--job", job_id, cwd=tmp_path, server=live_server)
    assert waited.returncode == 0, waited.stderr
    assert waited.stderr == "seed 42\n"
    [saved] = waited.stdout.splitlines()
    assert saved.startswith("a-red-fox-") and saved.endswith(".png")
    expected = client.post("/generate", json={"prompt": "a red fox", **FAST}).get_json()
    assert np.array_equal(np.asarray(pixels_of(tmp_path / saved)), pixels(expected["img"]))


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_cli_job_with_an_unknown_id_is_one_line_and_exit_1(live_server, tmp_path):
    result = run_cli("--job", "0" * 32, cwd=tmp_path, server=live_server)
    assert result.returncode == 1
    assert result.stderr.startswith("imagine: the server answered 404: no job '")
    assert result.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


# ---- the docs


def test_the_docs_curl_examples_run_as_written_for_the_whole_life_of_a_job(start_server, tmp_path):
    with socket.socket() as probe:
        port = 5000 if probe.connect_ex(("127.0.0.1", 5000)) != 0 else free_port()
    start_server(port)
    script = "\n".join(DOC_EXAMPLES).replace("localhost:5000", f"localhost:{port}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script}\n{result.stderr}"
    assert len(DOC_EXAMPLES) == 8  # submit, poll, events, Last-Event-ID, collect, cancel, its end, list
    out = result.stdout
    assert re.search(r"^\s+\d+ event: progress$", out, re.M) and re.search(r"^\s+\d+ event: preview$", out, re.M)
    assert len(re.findall(r"^\s+1 event: done$", out, re.M)) == 2  # the stream, then the picked-up stream
    assert "(256, 256)" in out
    # running, as a rule; withdrawn where the DELETE came before the engine took the job up
    assert re.search(r'^\{"status":"(running","cancelling":true|cancelled","cancelling":null)\}$', out, re.M)
    assert re.search(r"^event: cancelled$", out, re.M)
    assert out.rstrip().endswith('{"status":"cancelled"}\n{"status":"done"}')  # GET /jobs, newest first
