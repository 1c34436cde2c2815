"""/jobs through a Flask test client, as the job tests drive it: submit, poll until a status, follow the events."""

import json

from conftest import FAST, wait_until


def submit(client, body=None, **fields) -> dict:
    """Submits a job of FAST settings with `body` and `fields`; returns its 202 answer, failing the test on another."""
    response = client.post("/jobs", json={"prompt": "a job", **FAST, **(body or {}), **fields})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def job(client, job_id, query="") -> dict:
    """The job as GET /jobs/<id> (with `query`) answers; fails the test on any status but 200."""
    response = client.get(f"/jobs/{job_id}{query}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def wait_for(client, job_id, *statuses) -> dict:
    """Polls the job until its status is one of `statuses`; returns it then."""
    wait_until(lambda: job(client, job_id)["status"] in statuses, f"job {job_id} is {' or '.join(statuses)}")
    return job(client, job_id)


def parse_events(lines):
    """(id, event, data) for each event of a text/event-stream, as the lines come."""
    fields = {}
    for line in lines:
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif "data" in fields:
            yield int(fields["id"]), fields["event"], json.loads(fields["data"])
            fields = {}


def stream(client, job_id, query="", last_id=None):
    """GET /jobs/<id>/events through the test client, unbuffered; its events are read with `events(response)`."""
    headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
    return client.get(f"/jobs/{job_id}/events{query}", headers=headers, buffered=False)


def events(response):
    """(id, event, data) for each event of a `stream` answer, as they come."""
    return parse_events(line for chunk in response.response for line in chunk.decode().split("\n"))
