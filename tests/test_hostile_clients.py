"""Hard to knock over: what an adversarial trial found (issue 15), each through the real server (waitress)."""

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import FAST, count_loads, free_port, module_at, save_config_folder, wait_until
from PIL import Image

from api.channel import HALF_CLOSE_GRACE
from engine.demo import build_demo_pipeline
from engine.previews import png_base64
from engine.settings import CONFIGS_DIR


def post(url, body, **kwargs):
    return requests.post(f"{url}/generate", json=body, timeout=120, **kwargs)


def post_raw(url, data: bytes, **kwargs):
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{url}/generate", data=data, headers=headers, timeout=120, **kwargs)


def raw_exchange(url, request: bytes) -> bytes:
    """Sends bytes as they are on a socket of its own and returns the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                return answer
    return answer


def picture(format_name: str, **options) -> str:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return base64.b64encode(buffer.getvalue()).decode()


# ---- 1. bounded prompts and bounded parsing


@pytest.mark.parametrize("field", ["prompt", "neg"])
def test_a_prompt_or_negative_prompt_over_16k_characters_is_refused_naming_the_field_and_the_limit(
    live_server, engine, monkeypatch, field
):
    loads = count_loads(engine, monkeypatch)
    response = post(live_server, {"prompt": "x", field: "a cat " * 3000, **FAST})
    assert response.status_code == 400
    assert response.json()["error"] == f"{field} is 18000 characters long; at most 16000 are accepted"
    assert loads == []  # refused before any work


def test_a_prompt_of_16k_characters_is_accepted(live_server):
    response = post(live_server, {"prompt": "x" * 16_000, **FAST, "num_steps": 1})
    assert response.status_code == 200


def test_json_nested_deeper_than_python_can_parse_is_a_400_not_a_500(live_server):
    response = post_raw(live_server, b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")
    assert response.status_code == 400
    assert response.json()["error"] == "the body's JSON is nested too deeply"


def test_a_body_of_a_million_empty_objects_is_refused_unparsed(live_server):
    response = post_raw(live_server, b'{"prompt": "x", "n": [' + b"{}," * 1_000_000 + b"{}]}")
    assert response.status_code == 400
    assert "brackets and commas; at most 50000 are accepted" in response.json()["error"]


def peak_memory_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) // 1024


def server_pid(url: str) -> int:
    """The process of a server that start_server started, found by the port on its command line."""
    port = url.rpartition(":")[2]
    for path in Path("/proc").iterdir():
        try:
            if path.name.isdigit() and f"\0--port\0{port}\0".encode() in (path / "cmdline").read_bytes():
                return int(path.name)
        except OSError:
            continue
    raise AssertionError(f"no server process listens on port {port}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_a_30_mb_body_of_empty_objects_leaves_the_servers_peak_memory_flat(start_server):
    """Parsed, such a body costs some 35 times its size; refused from a count of its brackets, only the body."""
    url, _ = start_server(free_port())
    pid = server_pid(url)
    before = peak_memory_mib(pid)
    response = post_raw(url, b'{"prompt": "x", "n": [' + b"{}," * (10 * 2**20) + b"{}]}")
    assert response.status_code == 400
    assert peak_memory_mib(pid) - before < 250  # the 30 MB body, read and counted; parsed it would be > 1 GB


# ---- 2. only picture formats


@pytest.mark.parametrize("format_name", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_pictures_in_the_usual_formats_are_accepted_as_img(live_server, format_name):
    response = post(live_server, {"prompt": "x", "img": picture(format_name), **FAST, "num_steps": 2})
    assert response.status_code == 200, response.text


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(hello) print flush\nshowpage\n%%EOF\n"


@pytest.mark.parametrize(
    "data",
    [
        base64.b64encode(EPS).decode(),
        picture("TIFF"),
        picture("ICO"),
        picture("PCX"),
        picture("TGA"),
        picture("PPM"),
    ],
    ids=["EPS", "TIFF", "ICO", "PCX", "TGA", "PPM"],
)
def test_other_formats_pillow_knows_are_refused_unread(live_server, monkeypatch, data):
    from PIL import EpsImagePlugin

    ghostscript = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ghostscript.append(args))
    response = post(live_server, {"prompt": "x", "img": data, **FAST})
    assert response.status_code == 400
    assert response.json()["error"] == "img is not a picture in a format accepted: PNG, JPEG, WEBP, BMP, GIF"
    assert ghostscript == []


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_with_a_garbage_chunk_type_between_its_data_is_a_400(live_server):
    png = base64.b64decode(picture("PNG"))
    start = png.index(b"IDAT") - 4
    data = png[start + 8 : start + 8 + struct.unpack(">I", png[start : start + 4])[0]]
    pieces = png_chunk(b"IDAT", data[:100]) + png_chunk(b"\x00\xff!?", b"junk") + png_chunk(b"IDAT", data[100:])
    damaged = png[:start] + pieces + png[start + 12 + len(data) :]  # Pillow finds the junk only while decoding
    response = post(live_server, {"prompt": "x", "img": base64.b64encode(damaged).decode(), **FAST})
    assert response.status_code == 400
    assert response.json()["error"] == "img is a damaged picture that cannot be decoded"


# ---- 3. --max-queue 0


def test_max_queue_0_runs_one_request_and_refuses_the_next_while_it_runs(make_engine, serve, hold):
    held = hold()
    engine = make_engine(model="demo", max_queue=0, generate=held.generate)
    url = serve(engine)
    assert post(url, {"prompt": "x", **FAST}).status_code == 200  # idle: it runs

    held.stop_at(1)
    results = []
    running = threading.Thread(target=lambda: results.append(post(url, {"prompt": "x", **FAST})))
    running.start()
    wait_until(lambda: held.steps, "the first request runs")
    refused = post(url, {"prompt": "x", **FAST})
    assert refused.status_code == 503
    assert refused.json()["error"] == "the server is busy: 0 requests are waiting; try again"
    held.release()
    running.join()
    assert results[0].status_code == 200
    assert post(url, {"prompt": "x", **FAST}).status_code == 200  # idle again


# ---- 6. 500s that are 400s; a stream always ends with its last line


@pytest.mark.parametrize("model", ["/", "//", "///", "/."])
def test_a_model_named_like_the_root_is_a_client_error(live_server, model):
    response = post(live_server, {"prompt": "x", "model": model, **FAST})
    assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize("field", ["prompt", "neg"])
@pytest.mark.parametrize("stream", [0, 1])
def test_a_lone_surrogate_in_a_text_is_a_400_naming_the_field(live_server, field, stream):
    body = json.dumps({"prompt": "x", field: "a \ud800 cat", "stream": stream, **FAST}).encode()
    assert b"\\ud800" in body
    response = post_raw(live_server, body)
    assert response.status_code == 400
    assert response.json()["error"] == f"{field} must be valid Unicode text, not a lone surrogate \\ud800"


def test_a_failure_after_a_streams_first_line_ends_it_with_an_error_line(live_server, monkeypatch):
    def failing_for_the_final_picture(image, parameters=None, compress_level=6):
        if parameters is not None:
            raise RuntimeError("injected")
        return png_base64(image, parameters, compress_level)

    monkeypatch.setattr("api.native.png_base64", failing_for_the_final_picture)
    response = post(live_server, {"prompt": "x", **FAST, "stream": 1})
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[0]["done"] is False
    assert lines[-1] == {"error": "internal error; the server log has the details", "done": True}


# ---- 7. broken models


def test_a_diffusers_folder_without_weights_is_a_4xx_without_server_paths_and_evicts_nothing(
    make_engine, serve, tmp_path
):
    save_config_folder(build_demo_pipeline(CONFIGS_DIR / "sd1"), tmp_path / "hollow")
    engine = make_engine(model="demo", max_loaded=1)
    url = serve(engine)
    assert post(url, {"prompt": "x", **FAST}).status_code == 200  # the demo is loaded
    response = post(url, {"prompt": "x", "model": "hollow", **FAST})
    assert 400 <= response.status_code < 500
    assert str(tmp_path) not in response.text and "/" not in response.json()["error"]
    assert list(engine.models.loaded) == ["demo"]


@pytest.mark.parametrize(
    "index",
    [b"{not json", b"[]", b'"text"', b"\xff\xfe\x00garbage", b"[" * 5000],
    ids=["invalid", "array", "string", "not-utf8", "deep"],
)
def test_a_malformed_model_index_is_a_4xx(make_engine, serve, tmp_path, index):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_bytes(index)
    url = serve(make_engine(model="demo"))
    response = post(url, {"prompt": "x", "model": "broken", **FAST})
    assert 400 <= response.status_code < 500, response.text
    assert str(tmp_path) not in response.text


def test_a_checkpoint_that_passes_the_family_check_but_fails_to_load_keeps_the_loaded_model(
    make_engine, serve, tmp_path
):
    import torch
    from safetensors.torch import save_file

    save_file({"cond_stage_model.transformer.junk": torch.zeros(1)}, str(tmp_path / "fake.safetensors"))
    engine = make_engine(model="demo", max_loaded=1)
    url = serve(engine)
    assert post(url, {"prompt": "x", **FAST}).status_code == 200
    response = post(url, {"prompt": "x", "model": "fake", **FAST})
    assert response.status_code == 422
    assert str(tmp_path) not in response.text
    assert "cannot be loaded" in response.json()["error"]
    assert list(engine.models.loaded) == ["demo"]
    assert post(url, {"prompt": "x", **FAST}).status_code == 200


# ---- 8. the Host check reads the raw header


@pytest.mark.parametrize("host", [b"a_b.evil.com:5605", b"a_b.evil.com"])
def test_a_host_werkzeug_finds_invalid_is_still_refused(live_server, host):
    body = json.dumps({"prompt": "x", **FAST}).encode()
    answer = raw_exchange(
        live_server,
        b"POST /generate HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"is not a local name" in answer


# ---- 12. non-ASCII API keys


def test_a_utf8_api_key_sent_as_curl_sends_it_is_accepted(make_engine, serve):
    key = "clé-ключ-鍵"
    url = serve(make_engine(model="demo", api_key=key))
    authorized = post(url, {"prompt": "x", **FAST}, headers={"Authorization": b"Bearer " + key.encode()})
    assert authorized.status_code == 200
    wrong = post(url, {"prompt": "x", **FAST}, headers={"Authorization": b"Bearer cle"})
    assert wrong.status_code == 401


# ---- 14. cancel inside a step


@pytest.mark.parametrize(
    "leaves_in, must_not_run",
    [
        ("text_encoder.text_model.encoder.layers.1", "unet"),  # while the prompt is encoded
        ("unet.mid_block", "unet.up_blocks.0"),  # in the middle of the first step
        ("vae.decoder.mid_block", "vae.decoder.up_blocks.0"),  # while the picture is decoded
    ],
    ids=["encoding", "step", "decoding"],
)
def test_a_client_that_leaves_in_the_middle_of_a_step_stops_it_there_and_the_next_request_is_unharmed(
    make_engine, serve, leaves_in, must_not_run
):
    engine = make_engine(model="demo")
    url = serve(engine)
    body = {"prompt": "a cat", **FAST, "stream": 1}
    before = post(url, {**body, "stream": 0}).json()["img"]  # loads the model; the picture to compare with
    model = engine.models.loaded["demo"]
    if leaves_in.startswith("text_encoder") and not hasattr(model.txt2img.text_encoder, "text_model"):
        leaves_in = leaves_in.replace("text_model.", "")
    reached, ran_after = threading.Event(), []

    def client_leaves_here(module, args):
        if not reached.is_set():
            reached.set()
            wait_until(lambda: engine.running.cancelled(), "the server notices that the client left")

    first = module_at(model, leaves_in).register_forward_pre_hook(client_leaves_here)
    later = module_at(model, must_not_run).register_forward_pre_hook(
        lambda module, args: ran_after.append(module) if reached.is_set() else None
    )
    try:
        host, port = url.removeprefix("http://").split(":")
        # A prompt of its own: one encoded before is found in the model's encodings, and its encoder does not run.
        data = json.dumps({**body, "prompt": "a cat on a wall"}).encode()
        with socket.create_connection((host, int(port)), timeout=60) as connection:
            connection.sendall(
                b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            assert reached.wait(60)
            # A client that leaves right after its request is taken for one that only shut its sending side.
            time.sleep(HALF_CLOSE_GRACE)
        wait_until(lambda: engine.running is None, "the generation stops")
        assert ran_after == []  # stopped before the next block, not at the end of the step
    finally:
        first.remove()
        later.remove()
    assert post(url, {**body, "stream": 0}).json()["img"] == before


# ---- 4. readers that stop reading; 5. slow senders; 11. half-closed clients


def open_request(url, body: dict, receive_buffer: int | None = None) -> socket.socket:
    """Sends a /generate request on a socket of its own and returns the socket, unread."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.socket()
    if receive_buffer is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    connection.connect((host, int(port)))
    data = json.dumps(body).encode()
    connection.sendall(
        b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return connection


def answered(connection: socket.socket) -> bool:
    """Whether an answer has begun to arrive on the connection; reads none of it."""
    try:
        return bool(connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def test_streams_nobody_reads_hold_no_one_else_up_and_are_dropped_after_the_send_timeout(
    make_engine, serve, monkeypatch
):
    monkeypatch.setattr("api.channel.SEND_TIMEOUT", 3600)  # until the checks below are done
    engine = make_engine(model="demo", max_queue=4)  # 8 threads: 5 generation slots and 3 spares
    url = serve(engine)
    # Full previews of 512x512 noise: about 1 MB a line, far more than the socket buffers and waitress hold.
    body = {"prompt": "x", "width": 512, "height": 512, "num_steps": 12, "stream": 1, "preview": "full", "seed": 1}
    silent = [open_request(url, body, receive_buffer=4096) for _ in range(5)]
    try:
        all_generated = lambda: all(map(answered, silent)) and engine.unfinished == 0  # noqa: E731
        wait_until(all_generated, "the five are generated", timeout=600)
        # Their threads wait on readers that read nothing, holding every generation slot; the spares answer.
        assert requests.get(f"{url}/samplers", timeout=30).status_code == 200
        refused = post(url, {"prompt": "x", **FAST})
        assert refused.status_code == 503, refused.text
        monkeypatch.setattr("api.channel.SEND_TIMEOUT", 0.5)
        wait_until(lambda: post(url, {"prompt": "x", **FAST}).status_code == 200, "a generation is served again")
        for connection in silent:  # dropped: reset, or closed after what the buffers held (else: a timeout)
            connection.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while connection.recv(2**20):
                    pass
    finally:
        for connection in silent:
            connection.close()


def test_a_client_that_sends_its_headers_byte_by_byte_is_dropped_after_the_request_timeout(live_server, monkeypatch):
    monkeypatch.setattr("api.channel.REQUEST_TIMEOUT", 1)
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.setblocking(False)
        dropped = []

        def trickle_until_dropped():
            try:
                connection.send(b"X")
                dropped.append(connection.recv(100) == b"")
            except BlockingIOError:  # connected, nothing to read yet
                return False
            except OSError:  # reset
                dropped.append(True)
            return bool(dropped)

        connection.send(b"POST /generate HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        wait_until(trickle_until_dropped, "the server drops the slow client", timeout=30)
    assert post(live_server, {"prompt": "x", **FAST}).status_code == 200


def test_unfinished_uploads_cannot_hold_more_than_their_budget(live_server, monkeypatch):
    monkeypatch.setattr("api.channel.UPLOADS_BUDGET", 2 * 2**20)
    host, port = live_server.removeprefix("http://").split(":")
    head = b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 3000000\r\n\r\n"
    first, second = (socket.create_connection((host, int(port)), timeout=30) for _ in range(2))
    try:
        first.sendall(head + b" " * 1_500_000)
        second.settimeout(30)
        with pytest.raises(OSError):  # dropped: the write fails, or the read finds the connection closed
            for _ in range(100):
                second.sendall(b" " * 100_000)
            assert second.recv(100) != b""
        assert post(live_server, {"prompt": "x", **FAST}).status_code == 200  # small requests still pass
    finally:
        first.close()
        second.close()


def test_a_client_that_shuts_down_its_sending_side_still_gets_its_answer(live_server):
    """As `nc -N` does: the request, then shutdown(SHUT_WR), then read until the server closes."""
    connection = open_request(live_server, {"prompt": "x", **FAST})
    with connection:
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(120)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["seed"] == 42
