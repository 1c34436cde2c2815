"""Jobs and previews on a server that clients share without trusting each other (issue 35, items 8-13): a job's id
is the only way to its pictures, one client's jobs and streams cannot push out another's, a cancel never holds a
server thread, and previews are built once a step however many ask."""

import base64
import threading

import requests
from conftest import FAST, HEALTH_BOUND, health_while, noise_picture, png_data, run_cli, wait_until
from jobs_client import job, stream, submit, wait_for

import imagine

POLLERS = 13  # the trial's count of concurrent preview polls


# ---- 8: previews are built once a step, however many ask


def test_concurrent_full_preview_polls_share_one_decode_a_step_built_on_the_engines_thread(make_engine, serve, hold):
    held = hold()
    engine = make_engine(model="demo", generate=held.generate)
    url = serve(engine)
    assert requests.post(f"{url}/generate", json={"prompt": "x", **FAST}, timeout=60).ok  # the model is loaded
    decodes = []
    decoder = engine.models.loaded["demo"].txt2img.vae.decoder
    decoder.register_forward_pre_hook(lambda module, args: decodes.append(threading.current_thread().name))
    held.stop_at(2, 3)
    body = {"prompt": "a job", **FAST, "preview": "full"}
    job_id = requests.post(f"{url}/jobs", json=body, timeout=30).json()["id"]
    held.reached(2)

    def poll_together() -> list:
        start = threading.Barrier(POLLERS)
        answers = [None] * POLLERS

        def poll(index):
            start.wait()
            answers[index] = requests.get(f"{url}/jobs/{job_id}?preview=1", timeout=60).json()

        threads = [threading.Thread(target=poll, args=(index,)) for index in range(POLLERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    poll_together()  # they ask: the engine builds one preview at its next step
    held.release(2)
    held.reached(3)
    answers, slowest = health_while(url, poll_together)
    assert {answer["step"] for answer in answers} == {2}
    assert len({answer["preview"] for answer in answers}) == 1 and answers[0]["preview"]
    assert decodes == ["imagine-engine"]  # one decode for thirteen clients, on the engine's thread
    assert slowest < HEALTH_BOUND
    held.release()
    wait_until(lambda: requests.get(f"{url}/jobs/{job_id}", timeout=30).json()["status"] == "done", "it is done")


# ---- 9: a job's id is the only way to it


def test_a_keyless_server_open_to_other_machines_lists_no_jobs_and_shows_no_running_picture(make_engine, hold):
    held = hold(2)
    engine = make_engine(model="demo", host="0.0.0.0", generate=held.generate)
    client = imagine.create_app(engine).test_client()
    job_id = submit(client, preview="full")["id"]
    held.reached(2)
    refused = client.get("/jobs")
    assert refused.status_code == 403 and "IMAGINE_API_KEY" in refused.get_json()["error"]
    progress = [client.get("/sdapi/v1/progress").get_json() for _ in range(2)]  # the second would have a picture
    assert progress[-1]["state"]["sampling_step"] == 1 and progress[-1]["current_image"] is None
    assert job(client, job_id, "?preview=1")["status"] == "running"  # its id still reaches it
    held.release()
    assert wait_for(client, job_id, "done")["img"]


def test_a_server_with_a_key_lists_its_jobs_to_the_key_holders(make_engine):
    engine = make_engine(model="demo", host="0.0.0.0", api_key="secret")
    client = imagine.create_app(engine).test_client()
    key = {"Authorization": "Bearer secret"}
    answer = client.post("/jobs", json={"prompt": "a job", **FAST}, headers=key).get_json()
    assert client.get("/jobs").status_code == 401
    assert [each["id"] for each in client.get("/jobs", headers=key).get_json()["jobs"]] == [answer["id"]]


# ---- 10: another client's flood does not push out a picture nobody has collected yet


def test_a_flood_of_cancelled_jobs_never_evicts_a_done_picture_nobody_has_collected(make_engine, hold):
    held = hold()
    engine = make_engine(model="demo", max_jobs=2, generate=held.generate)
    app = imagine.create_app(engine)
    client, store = app.test_client(), app.extensions["imagine.jobs"]
    victim = submit(client, seed=7)["id"]
    wait_until(lambda: store.get(victim).status == "done", "the victim's job is done")  # done, not fetched
    held.stop_at(1)
    blocker = submit(client)["id"]
    held.reached(1)
    flood = [submit(client)["id"] for _ in range(6)]
    for each in flood:
        assert client.delete(f"/jobs/{each}").get_json()["status"] == "cancelled"
    assert job(client, victim)["img"]  # past max-jobs six times over, and still there
    listed = [each["id"] for each in client.get("/jobs").get_json()["jobs"]]
    assert listed == [flood[-1], blocker, victim]  # newest first: the cap took the flood, oldest first
    held.release()
    wait_for(client, blocker, "done")


# ---- 11: one client's streams cannot take another's


def test_a_job_has_at_most_three_event_streams_and_another_job_still_gets_its_own(make_engine, hold):
    held = hold(1)
    engine = make_engine(model="demo", max_queue=8, generate=held.generate)
    client = imagine.create_app(engine).test_client()
    attacker, victim = submit(client)["id"], submit(client)["id"]
    held.reached(1)
    opened = [stream(client, attacker) for _ in range(3)]
    refused = stream(client, attacker)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert f"for job {attacker} (at most 3)" in refused.get_json()["error"]
    assert "poll GET /jobs/<id> instead" in refused.get_json()["error"]
    own = stream(client, victim)
    assert own.status_code == 200
    for response in [*opened, own]:
        response.close()
    assert stream(client, attacker).status_code == 200  # a closed stream gave its place back
    held.release()
    wait_for(client, victim, "done")


def test_the_cli_follows_a_job_whose_streams_are_taken_by_polling_it(make_engine, serve, hold, tmp_path):
    held = hold(2)
    engine = make_engine(model="demo", max_queue=2, generate=held.generate)  # three streams: the server's all
    url = serve(engine)
    job_id = requests.post(f"{url}/jobs", json={"prompt": "a lighthouse", **FAST}, timeout=30).json()["id"]
    held.reached(2)
    taken = [requests.get(f"{url}/jobs/{job_id}/events", stream=True, timeout=30) for _ in range(3)]
    assert all(response.status_code == 200 for response in taken)
    releaser = threading.Timer(2.0, held.release)  # the CLI has polled a few times by then
    releaser.start()
    result = run_cli("--job", job_id, "-o", "polled.png", cwd=tmp_path, server=url)
    releaser.join()
    for response in taken:
        response.close()
    assert result.returncode == 0, result.stderr
    done = requests.get(f"{url}/jobs/{job_id}", timeout=30).json()
    assert (tmp_path / "polled.png").read_bytes() == base64.b64decode(done["img"])


# ---- 12: a cancel answers at once, whatever the engine is doing


def test_deletes_during_a_long_model_load_answer_at_once_and_the_job_ends_cancelled(make_engine, serve, monkeypatch):
    engine = make_engine(model="demo")
    url = serve(engine)
    loading, load_may_end = threading.Event(), threading.Event()
    load = engine.models.load

    def slow_load(key, family):  # a model of many gigabytes from a slow disk
        loading.set()
        assert load_may_end.wait(60)
        return load(key, family)

    monkeypatch.setattr(engine.models, "load", slow_load)
    job_id = requests.post(f"{url}/jobs", json={"prompt": "x", **FAST}, timeout=30).json()["id"]
    assert loading.wait(60)

    def delete_many() -> list:
        answers = []
        threads = [
            threading.Thread(target=lambda: answers.append(requests.delete(f"{url}/jobs/{job_id}", timeout=60)))
            for _ in range(30)  # more than the server's threads: each waiting would have left none for /health
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    answers, slowest = health_while(url, delete_many)
    assert {answer.status_code for answer in answers} == {202}
    assert all(answer.json()["cancelling"] is True for answer in answers)
    assert slowest < HEALTH_BOUND
    load_may_end.set()
    wait_until(lambda: requests.get(f"{url}/jobs/{job_id}", timeout=30).json()["status"] == "cancelled", "it stops")
    assert requests.get(f"{url}/jobs/{job_id}", timeout=30).json()["error"] == f"cancelled by DELETE /jobs/{job_id}"


# ---- 13: img2img with no picture is refused


def test_a1111_img2img_with_a_null_init_image_is_422_not_a_text_to_image_picture(client):
    for images in ([None], [], [""]):
        body = {"prompt": "a cat", "init_images": images, "width": 64, "height": 64, "steps": 2}
        refused = client.post("/sdapi/v1/img2img", json=body)
        assert refused.status_code == 422, images
        assert refused.get_json()["detail"].startswith("init_images")
    kept = client.post("/sdapi/v1/img2img", json={**body, "init_images": [png_data(noise_picture())]})
    assert kept.status_code == 200
