"""Generated and malformed bodies never get a 5xx; many concurrent clients on loopback all get their answers."""

import base64
import json
import string
import threading

import pytest
import requests
from conftest import serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imagine
from engine.engine import Engine
from engine.request import REQUEST_FIELDS

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
FIELDS = sorted(REQUEST_FIELDS) + ["negative_prompt", "", "\0", "model\0"]
# Values close to valid ones find more: real sampler names, sizes near the bounds, names that look like paths.
NEAR_VALID = st.sampled_from(
    [64, 72, 0, -8, 2**31, 1.0, 0.5, "64", "euler a", "DPM++ 2M", "demo", "../demo", "/etc/passwd", "a\0b", ""]
)
# Lone surrogates (valid JSON escapes, invalid text) and pictures in formats that are refused unread.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
TIFF = b"II*\x00\x08\x00\x00\x00" + b"\x00" * 32
HOSTILE = st.sampled_from(
    ["\ud800", "a\udfffb", "\udc00\ud800", base64.b64encode(EPS).decode(), base64.b64encode(TIFF).decode()]
)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES | NEAR_VALID | HOSTILE, max_size=6)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    """The demo model with the largest size set to the smallest one, so whatever a body asks for stays quick."""
    models_dir = tmp_path_factory.mktemp("fuzz-models")
    engine = Engine(imagine.Settings(model="demo", models_dir=models_dir, max_size=64))
    engine.start()
    return imagine.create_app(engine).test_client()


def assert_a_clear_answer(response):
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.is_json and isinstance(response.get_json(), dict)
    if response.status_code >= 400:
        assert isinstance(response.get_json()["error"], str)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, prompt=st.none() | st.text(max_size=20))
def test_generated_bodies_never_get_a_server_error(fuzz_client, body, prompt):
    if prompt is not None:
        body = {**body, "prompt": prompt}
    body.setdefault("num_steps", 1)  # keeps the bodies that are valid quick
    assert_a_clear_answer(fuzz_client.post("/generate", data=json.dumps(body), content_type="application/json"))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=200) | st.text(alphabet=string.printable, max_size=200).map(str.encode),
    content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", ""]),
)
def test_malformed_bodies_never_get_a_server_error(fuzz_client, data, content_type):
    assert_a_clear_answer(fuzz_client.post("/generate", data=data, content_type=content_type))


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(min_value=1, max_value=60_000), opener=st.sampled_from(["[", '{"a":']))
def test_deeply_nested_bodies_never_get_a_server_error(fuzz_client, depth, opener):
    closer = "]" if opener == "[" else "}"
    data = '{"prompt": "x", "n": ' + opener * depth + "1" + closer * depth + "}"
    assert_a_clear_answer(fuzz_client.post("/generate", data=data, content_type="application/json"))


def test_the_server_still_draws_after_the_fuzzing(fuzz_client):
    response = fuzz_client.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "num_steps": 2})
    assert response.status_code == 200


def test_many_concurrent_clients_on_loopback_each_get_an_answer_and_accepted_ones_their_picture(make_engine):
    engine = make_engine(model="demo", max_queue=4)
    answers = []

    def client(number):
        for request in range(3):
            seed = number * 10 + request
            body = {"prompt": "x", "width": 64, "height": 64, "num_steps": 2, "seed": seed}
            response = requests.post(url, json=body, timeout=120)
            answers.append((seed, response.status_code, response.json(), response.headers.get("Retry-After")))

    with serving(engine) as server:
        url = f"{server}/generate"
        clients = [threading.Thread(target=client, args=(number,)) for number in range(16)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=300)
        assert len(answers) == 48  # every request answered
        for seed, status, body, retry_after in answers:
            assert status in (200, 503), body
            if status == 200:
                assert body["seed"] == seed and body["width"] == 64
            else:
                assert int(retry_after) >= 1 and "busy" in body["error"]
        assert any(status == 200 for _, status, _, _ in answers)
        assert requests.post(url, json={"prompt": "x", "width": 64, "height": 64, "num_steps": 2}).status_code == 200
