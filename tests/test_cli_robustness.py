"""imagine-cli.py against what can go wrong around it (issue 15): outputs that are not plain files, answers that are
not Imagine's, broken connections and signals. The CLI runs as a user runs it, in a process of its own."""

import base64
import contextlib
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CLI, TINY, run_cli
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- 9. -o writes into what it names, never replacing a device, a pipe or a link


def test_output_to_a_pipe_writes_into_it_and_leaves_it_a_pipe(live_server, tmp_path):
    fifo = tmp_path / "picture.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the CLI's open for writing does not wait
    try:
        result = run_cli("a", "fox", *TINY, "-o", str(fifo), cwd=tmp_path, server=live_server)
        assert result.returncode == 0, result.stderr
        assert stat.S_ISFIFO(fifo.lstat().st_mode)
        assert os.read(reader, 2**16).startswith(PNG_SIGNATURE)
    finally:
        os.close(reader)


def test_output_to_a_link_writes_the_file_it_points_to_and_keeps_the_link(live_server, tmp_path):
    (tmp_path / "pictures").mkdir()
    target = tmp_path / "pictures" / "fox.png"
    target.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    result = run_cli("a", "fox", *TINY, "-b", "2", "-o", str(link), cwd=tmp_path, server=live_server)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == target
    assert Image.open(target).size == (64, 64)
    second = tmp_path / "latest-2.png"  # the batch's second picture: a new name, a regular file
    assert stat.S_ISREG(second.lstat().st_mode) and second.read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest-2.png", "latest.png", "pictures"]
    assert [path.name for path in target.parent.iterdir()] == ["fox.png"]  # no temporary file left


def test_stream_previews_to_a_link_to_a_pipe_go_through_the_link(live_server, tmp_path):
    fifo = tmp_path / "picture.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "out.png"
    link.symlink_to(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        result = run_cli("a", "fox", *TINY, "--stream", "2", "-o", str(link), cwd=tmp_path, server=live_server)
        assert result.returncode == 0, result.stderr
        assert link.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
        assert os.read(reader, 2**20).count(PNG_SIGNATURE) == 2  # the preview of step 2, then the picture
    finally:
        os.close(reader)


# ---- 10. answers that are not Imagine's, broken connections, signals: one line, no file left behind


@contextlib.contextmanager
def fake_server(answer: bytes, reset: bool = False, hold: bool = False):
    """A socket server that answers one request with `answer` as it is, then closes (with a reset, or after
    the test ends with `hold`); yields its URL and an event set once the request has come."""
    listener = socket.create_server(("127.0.0.1", 0))
    requested = threading.Event()
    done = threading.Event()

    def answer_one():
        connection, _ = listener.accept()
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += connection.recv(65536)
            requested.set()
            connection.sendall(answer)
            if hold:
                done.wait(60)
            if reset:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=answer_one, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", requested
    finally:
        done.set()
        thread.join(30)
        listener.close()


def http_answer(content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def stream_answer(*lines: bytes) -> bytes:
    return http_answer("application/x-ndjson", b"".join(line + b"\n" for line in lines))


PREVIEW = json.dumps({"img": base64.b64encode(PNG_SIGNATURE).decode(), "step": 1, "steps": 4, "done": False})


def assert_one_line_and_no_file(result, cwd: Path) -> str:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagine: "), result.stderr
    assert "None" not in lines[0]
    assert list(cwd.iterdir()) == []  # neither the picture's reserved name nor a temporary file
    return lines[0]


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"{}",
        b"[1]",
        b'{"img": "not base64!", "step": 1, "steps": 4, "done": false}',
        b'{"step": "1", "steps": 4, "done": false}',
        b'{"img": "iVBORw0KGgo=", "seed": "42", "done": true}',
        b'{"images": 5, "img": "iVBORw0KGgo=", "seed": 42, "done": true}',
    ],
    ids=["invalid-json", "empty-object", "array", "bad-base64", "string-step", "string-seed", "images-not-a-list"],
)
def test_a_stream_line_that_is_not_imagines_ends_the_cli_with_one_line(tmp_path, line):
    with fake_server(stream_answer(PREVIEW.encode(), line)) as (url, _):
        result = run_cli("a", "fox", "--stream", "1", cwd=tmp_path, server=url)
    message = assert_one_line_and_no_file(result, tmp_path)
    assert "cannot read" in message or "not Imagine's" in message


def test_an_html_page_with_status_200_is_named_as_not_imagines_answer(tmp_path):
    with fake_server(http_answer("text/html", b"<html><body>Welcome to nginx!</body></html>")) as (url, _):
        result = run_cli("a", "fox", cwd=tmp_path, server=url)
    assert "<html><body>Welcome to nginx!" in assert_one_line_and_no_file(result, tmp_path)


@pytest.mark.parametrize("stream", [True, False])
def test_a_connection_reset_in_the_middle_of_the_answer_is_one_line(tmp_path, stream):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    with fake_server(head + PREVIEW.encode() + b'\n{"img": "iVBO', reset=True) as (url, _):
        result = run_cli("a", "fox", *(["--stream", "1"] if stream else []), cwd=tmp_path, server=url)
    assert "connection to the server" in assert_one_line_and_no_file(result, tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_waiting_for_the_picture_leaves_no_file(tmp_path, signum):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    with fake_server(head, hold=True) as (url, requested):
        env = {k: v for k, v in os.environ.items() if k != "IMAGINE_API_KEY"}
        command = [sys.executable, str(CLI), "a", "fox", "--stream", "1", "--server", url]
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert requested.wait(60)
        assert len(list(tmp_path.iterdir())) == 1  # the picture's name, reserved
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert stderr.decode().splitlines() == [f"imagine: stopped by {signal.Signals(signum).name}"]
    assert list(tmp_path.iterdir()) == []
