"""Imagine's own API from the client's side, as the CLI (imagine-cli.py) speaks it: a request to the server, and its
answer, stream lines or job events read into updates (a dict like a line of /generate's stream: `step` and `steps`,
`png` and `pngs`, `seed`, `done`, or `error`); anything not shaped as Imagine's answers is a ClientError in words.
It needs only requests: the CLI imports it before torch, which it loads only to generate in its own process."""

import base64
import json
import os
import time
import urllib.parse

import requests


class ClientError(Exception):
    """A failure the client reports in one line (the CLI: on stderr, ending with exit status 1)."""


class NoServer(ClientError):
    """Nothing listens at the server's address."""


class Busy(ClientError):
    """The server refused for now (503): it has no room for the request, which may be tried again or another way."""


def api_headers(extra: dict | None = None) -> dict:
    key = os.environ.get("IMAGINE_API_KEY")
    return {**({"Authorization": f"Bearer {key}"} if key else {}), **(extra or {})}


def server_request(method: str, server: str, path: str, expect: int = 200, headers=None, **options):
    """A request to the server, its answer checked for the `expect`ed status; a NoServer or ClientError otherwise."""
    options.setdefault("timeout", (10, 60))
    try:
        url = f"{server.rstrip('/')}{path}"
        response = requests.request(method, url, headers=api_headers(headers), **options)
    except requests.ConnectionError:
        raise NoServer(f"cannot connect to the server at {server}; is it running?") from None
    except requests.RequestException as error:
        raise ClientError(f"cannot reach the server at {server}: {error}") from None
    if response.status_code != expect:
        with response:
            raise refusal(response)
    return response


def remote_updates(server: str, body: dict):
    response = server_request("POST", server, "/generate", json=body, stream=True, timeout=(10, None))
    with response:
        try:
            if "stream" not in body:
                yield update_from(answer_fields(response.content), streamed=False)
                return
            for line in response.iter_lines():
                if line:
                    yield update_from(answer_fields(line), streamed=True)
        except requests.RequestException:  # reset, or closed in the middle of the answer
            raise ClientError(f"the connection to the server at {server} broke before the picture came") from None


def answer_fields(text: bytes) -> dict:
    """A JSON object the server sent; anything else (an HTML page, a truncated line) is a ClientError."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        shown = text[:60].decode(errors="replace")
        raise ClientError(f"the server's answer is not Imagine's JSON: {shown!r}; is the server an Imagine server?")
    return answer


def update_from(answer: dict, streamed: bool) -> dict:
    """An answer, or a line of a stream, as an update; a ClientError if it is not shaped as Imagine's."""
    if "error" in answer:
        return {"error": str(answer["error"])}
    done = answer.get("done", True) is True or not streamed  # a plain answer is done; a stream line says if it is
    required = ("img", "seed") if done else ("step", "steps")
    update = {"done": done}
    try:
        for field in ("step", "steps", "seed"):
            if field in answer:
                update[field] = answer[field]
                if type(answer[field]) is not int:
                    raise ValueError
        if "img" in answer:
            update["png"] = base64.b64decode(answer["img"], validate=True)
        if "images" in answer:
            update["pngs"] = [base64.b64decode(image, validate=True) for image in answer["images"]]
        if not all(field in answer for field in required):
            raise ValueError
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        fields = json.dumps(answer)[:60]
        raise ClientError(f"the server sent an answer the CLI cannot read: {fields}") from None
    return update


def refusal(response: requests.Response) -> ClientError:
    """The server's refusal on one line; a 401 says where the CLI takes the key from."""
    message = f"the server answered {response.status_code}: {error_message(response)}"
    if response.status_code == 401:
        message += "; set IMAGINE_API_KEY to the server's key"
    return Busy(message) if response.status_code == 503 else ClientError(message)


def error_message(response: requests.Response) -> str:
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason


# ---------------------------------------------------------------------------------------------
# Models by name: pulled (POST /pull, its NDJSON lines) and removed (DELETE /models/<name>)
# ---------------------------------------------------------------------------------------------


def pull_lines(server: str, name: str):
    """The lines of the server's pull of `name`, each a dict; an error line is a ClientError."""
    response = server_request("POST", server, "/pull", json={"model": name}, stream=True, timeout=(10, None))
    with response:
        try:
            for raw in response.iter_lines():
                if raw:
                    line = answer_fields(raw)
                    if "error" in line:
                        raise ClientError(str(line["error"]))
                    yield line
        except requests.RequestException:
            raise ClientError(f"the connection to the server at {server} broke; pull again to resume") from None


def remove_model(server: str, name: str) -> dict:
    path = f"/models/{urllib.parse.quote(name, safe='')}"
    return answer_fields(server_request("DELETE", server, path).content)


# ---------------------------------------------------------------------------------------------
# Jobs: queued on the server (POST /jobs), then followed (GET /jobs/<id>/events)
# ---------------------------------------------------------------------------------------------

JOB_ENDS = ("done", "failed", "cancelled")
RECONNECTS = 5  # times in a row a broken event stream is picked up again before the CLI gives up
POLL_SECONDS = 1.0  # how often a job is asked where it stands when the server has no event stream to spare


def detach(server: str, body: dict) -> str:
    """Queues the request as a job; returns its id."""
    answer = answer_fields(server_request("POST", server, "/jobs", expect=202, json=body).content)
    if not isinstance(answer.get("id"), str):
        raise ClientError(f"the server sent an answer the CLI cannot read: {json.dumps(answer)[:60]}")
    return answer["id"]


def job_path(job_id: str) -> str:
    return f"/jobs/{urllib.parse.quote(job_id, safe='')}"


def job_updates(server: str, job_id: str, every: int | None):
    """The job's events as updates. A stream that breaks (a proxy's idle cut, a network change)
    is picked up where it broke, with the id of the last event seen (Last-Event-ID); a server that has no stream to
    spare (503) is polled instead."""
    path = job_path(job_id) + "/events" + (f"?every={every}" if every else "")
    last_id, breaks = None, 0
    while breaks < RECONNECTS:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            response = server_request("GET", server, path, headers=headers, stream=True, timeout=(10, 120))
        except Busy:
            yield from polled_updates(server, job_id, every)
            return
        try:
            with response:
                for event_id, kind, data in sse_events(response.iter_lines(decode_unicode=True)):
                    last_id, breaks = event_id or last_id, 0
                    yield job_update(kind, answer_fields(data.encode()))
                    if kind in JOB_ENDS:
                        return
        except requests.RequestException:
            pass
        breaks += 1
        time.sleep(1)
    message = f"the connection to {server} broke {RECONNECTS} times in a row; try again: imagine --job {job_id}"
    raise ClientError(message)


def polled_updates(server: str, job_id: str, every: int | None):
    """The job's updates as GET /jobs/<id> shows them, asked for every POLL_SECONDS: a step when it moved on, with
    the latest preview where previews are asked for, then its end."""
    path = job_path(job_id) + ("?preview=1" if every else "")
    step = None
    while True:
        answer = answer_fields(server_request("GET", server, path).content)
        if answer.get("status") in JOB_ENDS:
            yield job_update(answer["status"], answer)
            return
        if answer.get("step") != step and answer.get("steps"):
            step = answer.get("step")
            shown = {"img": answer["preview"]} if answer.get("preview") else {}
            yield job_update("progress", {"step": step, "steps": answer["steps"], **shown})
        time.sleep(POLL_SECONDS)


def sse_events(lines):
    """(id, event, data) for each event of a text/event-stream; comments and unknown fields are skipped."""
    fields = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif "data" in fields:
            yield fields.get("id"), fields.get("event", "message"), fields["data"]
            fields = {}
        else:
            fields = {}


def job_update(kind: str, answer: dict) -> dict:
    """One event of a job's stream as an update."""
    if kind in ("progress", "preview"):
        return update_from({**answer, "done": False}, streamed=True)
    if kind == "done":
        return update_from(answer, streamed=False)
    if kind in JOB_ENDS:
        return {"error": f"the job {kind}: {answer.get('error', 'no reason given')}"}
    return {}
