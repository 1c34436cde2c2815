"""Limits with clear answers: every field bounded and typed, the body capped, input pictures bounded."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import FAST, png_data, serving
from PIL import Image

import imagine
from api.native import MAX_BODY_BYTES
from engine.fields import MAX_IMG_PIXELS

ROOT = Path(__file__).resolve().parent.parent


def post_raw(client, data, content_type="application/json"):
    return client.post("/generate", data=data, content_type=content_type)


@pytest.mark.parametrize(
    "raw, message",
    [
        ('{"prompt": "x", "guidance": NaN}', "guidance must be between 0.0 and 30.0, not nan"),
        ('{"prompt": "x", "guidance": Infinity}', "guidance must be between 0.0 and 30.0, not inf"),
        ('{"prompt": "x", "strength": -Infinity}', "strength must be between 0.0 and 1.0, not -inf"),
        ('{"prompt": "x", "width": true}', "width must be an integer, not true"),
        ('{"prompt": "x", "seed": false}', "seed must be an integer, not false"),
        ('{"prompt": "x", "guidance": true}', "guidance must be a number, not true"),
        ('{"prompt": "x", "stream": 1e400}', "stream must be an integer, not Infinity"),
        ('{"prompt": "x", "width": 64.0}', "width must be an integer, not 64.0"),
    ],
)
def test_non_finite_numbers_and_booleans_are_refused_naming_the_field(client, raw, message):
    response = post_raw(client, raw)
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_the_largest_size_is_a_setting(make_engine):
    client = imagine.create_app(make_engine(model="demo", max_size=128)).test_client()
    response = client.post("/generate", json={"prompt": "x", **FAST, "width": 136})
    assert response.status_code == 400
    assert response.get_json()["error"] == "width must be between 64 and 128, not 136"
    assert client.post("/generate", json={"prompt": "x", **FAST, "width": 128}).status_code == 200


def test_the_largest_size_comes_from_a_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGINE_MAX_SIZE", "1024")
    assert imagine.parse_settings([]).max_size == 1024
    assert imagine.parse_settings(["--max-size", "768"]).max_size == 768
    with pytest.raises(SystemExit):
        imagine.parse_settings(["--max-size", "100"])


def test_a_body_over_the_cap_answers_413_json_before_it_is_read(client):
    body = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = post_raw(client, body)
    assert response.status_code == 413
    assert "error" in response.get_json()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_answers_415_whatever_it_claims_to_be(client, content_type):
    response = post_raw(client, json.dumps({"prompt": "x", **FAST}), content_type)
    assert response.status_code == 415
    assert "Content-Type: application/json" in response.get_json()["error"]


def test_an_img_over_the_pixel_bound_is_refused_from_its_header_without_decoding_it(client, monkeypatch):
    bomb = png_data(Image.new("1", (5000, 5000)))  # 25 million pixels, below Pillow's own bomb limit
    decoded = []
    load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda image: decoded.append(image.size) or load(image))
    response = client.post("/generate", json={"prompt": "x", "img": bomb, "width": 64, "height": 64})
    assert response.status_code == 400
    assert response.get_json()["error"] == f"img is 5000x5000; at most {MAX_IMG_PIXELS} pixels are accepted"
    assert (5000, 5000) not in decoded


def test_a_largest_size_below_512_also_lowers_the_default_size(make_engine):
    client = imagine.create_app(make_engine(model="demo", max_size=64)).test_client()
    response = client.post("/generate", json={"prompt": "x", "num_steps": 1})
    assert response.status_code == 200
    assert (response.get_json()["width"], response.get_json()["height"]) == (64, 64)


def test_through_waitress_a_large_body_gets_a_json_413_and_a_huge_one_is_refused_unread(engine):
    with serving(engine) as url:
        large = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
        response = requests.post(
            f"{url}/generate", data=large, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert response.status_code == 413 and "error" in response.json()
        with socket.create_connection(("127.0.0.1", int(url.rpartition(":")[2])), timeout=30) as connection:
            connection.sendall(
                b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {10 * MAX_BODY_BYTES}\r\n\r\n".encode()
            )
            assert connection.recv(100).startswith(b"HTTP/1.1 413")  # answered with no body sent


BOMB_SCRIPT = """
import base64, resource, struct, sys, zlib
sys.path.insert(0, sys.argv[1])
import imagine
from engine.engine import Engine

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

# An 8000x8000 RGB PNG of zeros: 190 KB of file, 192 MB once decoded. Below Pillow's own bomb limit
# (89 million pixels), so only Imagine's bound stands between it and the decoder. Compressed row by
# row, so that building it costs this process no memory worth counting.
width = height = 8000
packer, row = zlib.compressobj(9), b"\\0" * (1 + 3 * width)
idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", idat) + chunk(b"IEND", b"")
engine = Engine(imagine.Settings(model="demo", device="cpu"))
engine.start()
client = imagine.create_app(engine).test_client()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
body = {"prompt": "x", "img": base64.b64encode(png).decode(), "width": 64, "height": 64}
answer = client.post("/generate", json=body)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(answer.status_code, (after - before) // 1024)
"""


def test_a_decompression_bomb_gets_400_and_the_peak_memory_stays_flat(tmp_path):
    """In a fresh process, whose peak memory (ru_maxrss) this request alone can raise."""
    result = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=300, check=True
    )
    status, peak_growth_mib = map(int, result.stdout.split())
    assert status == 400
    assert peak_growth_mib < 20  # decoding it would take 192 MB
