"""Hard to knock over, round three (issue 25), first half: what one client's requests could do to the whole server,
each through the real server (waitress): text built to backtrack, over-long names, prompts and embeddings, bad values
and keys, an A1111 interrupt, foreign hosts. Where an attack used to hold the process, /health is asked through
waitress while it runs. What the models folder and the disk could do: test_hard_to_knock_over_files."""

import base64
import io
import json
import threading

import pytest
import requests
import torch
from conftest import FAST, HEALTH_BOUND, decode_png, health_while
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import api.a1111_files
import api.guard
import api.openai
import engine.files.catalog
import engine.prompts
import engine.request
import imagine


def png_with_parameters(text: str) -> str:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


# ---- 1. png-info parses in linear time


@pytest.mark.parametrize(
    "text",
    ['a cat\nSteps: "' + "\\" * 40, "a cat\n" + " " * 2000, "a cat\nSteps: 20, " + "a " * 15_000 + "x"],
    ids=["unclosed-quote-of-backslashes", "spaces", "words-without-colon"],
)
def test_png_info_of_parameters_built_to_backtrack_answers_at_once_and_health_stays_quick(live_server, text):
    image = png_with_parameters(text)
    answer, slowest = health_while(
        live_server, lambda: requests.post(f"{live_server}/sdapi/v1/png-info", json={"image": image}, timeout=300)
    )
    assert answer.status_code == 200
    assert answer.json()["info"] == text
    assert slowest < HEALTH_BOUND


def test_png_info_still_reads_quoted_values_and_every_setting(client):
    text = 'a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2", Size: 64x96'
    parsed = client.post("/sdapi/v1/png-info", json={"image": png_with_parameters(text)}).get_json()["parameters"]
    assert parsed["Prompt"] == "a cat" and parsed["Negative prompt"] == "dog"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "Euler a"
    assert parsed["Lora hashes"] == '"a: 1, b: 2"'
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "96")


def test_png_info_of_a_parameters_text_over_the_limit_is_a_422_naming_the_limit(live_server):
    image = png_with_parameters("a" * (api.a1111_files.MAX_PARAMETERS_CHARS + 1))
    answer = requests.post(f"{live_server}/sdapi/v1/png-info", json={"image": image}, timeout=60)
    assert answer.status_code == 422
    assert str(api.a1111_files.MAX_PARAMETERS_CHARS) in answer.json()["detail"]


# ---- 2. model names are short strings, and unknown OpenAI names leave no state behind


@pytest.mark.parametrize("route", ["/generate", "/v1/images/generations"])
def test_a_model_name_longer_than_a_name_is_refused_naming_the_field_and_the_limit(client, route, caplog):
    body = {"prompt": "a cat", "model": "m" * 1_000_000}
    answer = client.post(route, json=body)
    assert answer.status_code == 400
    message = answer.get_json()["error"]
    message = message["message"] if isinstance(message, dict) else message
    assert message == f"model is 1000000 characters long; at most {engine.request.MAX_NAME_CHARS} are accepted"
    assert all(len(record.getMessage()) < 1000 for record in caplog.records)


def test_unknown_openai_model_names_are_remembered_only_up_to_a_bound(client, monkeypatch, caplog):
    monkeypatch.setattr(engine.files.catalog, "FALLBACKS_KEPT", 2)
    caplog.set_level("INFO", logger="imagine")
    # Names no other test sends: the app is shared across this file, and what it already remembers would count.
    for name in ("never-sent-1", "never-sent-2", "never-sent-3", "never-sent-1"):
        body = {"prompt": "a cat", "model": name, "steps": 1, "size": "64x64"}
        assert client.post("/v1/images/generations", json=body).status_code == 200
    logged = [record.getMessage() for record in caplog.records if "is not here" in record.getMessage()]
    assert len(logged) == 4  # never-sent-1 was forgotten, so it is told again: nothing keeps every name


# ---- 3. A1111 checkpoint names are read in linear time


@pytest.mark.parametrize("where", ["options", "override_settings"])
def test_an_a1111_checkpoint_name_of_a_long_run_of_spaces_is_refused_at_once_while_health_answers(live_server, where):
    name = "a" + " " * 200_000 + "a"
    if where == "options":
        call = lambda: requests.post(f"{live_server}/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=300)  # noqa: E731
    else:
        body = {
            "prompt": "a cat",
            "steps": 1,
            "width": 64,
            "height": 64,
            "override_settings": {"sd_model_checkpoint": name},
        }
        call = lambda: requests.post(f"{live_server}/sdapi/v1/txt2img", json=body, timeout=300)  # noqa: E731
    answer, slowest = health_while(live_server, call)
    assert answer.status_code == 422
    assert f"at most {engine.request.MAX_NAME_CHARS} are accepted" in answer.json()["detail"]
    assert slowest < HEALTH_BOUND


def test_an_a1111_title_with_its_hash_still_names_the_model(client):
    answer = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo [0123456789]"})
    assert answer.status_code == 200


# ---- 4. a bound on prompt chunks


@pytest.mark.parametrize(
    "field, text",
    [("prompt", "a cat BREAK " * 100), ("neg", "a dog BREAK " * 100), ("prompt", "a, " * 5000)],
    ids=["breaks", "breaks-in-neg", "tokens"],
)
def test_a_prompt_of_more_chunks_than_the_limit_is_a_400_naming_the_field_and_the_limit(client, field, text):
    answer = client.post("/generate", json={"prompt": "a cat", **FAST, field: text})
    assert answer.status_code == 400
    message = answer.get_json()["error"]
    assert message.startswith(f"{field} is ") and f"at most {engine.prompts.MAX_PROMPT_CHUNKS}" in message


def test_a_prompt_of_many_breaks_is_a_422_on_the_a1111_api(client):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a BREAK " * 100, "steps": 1, "width": 64, "height": 64})
    assert answer.status_code == 422


# ---- 5. long runs of spaces


def test_long_runs_of_spaces_in_prompt_and_negative_do_not_hold_the_server(live_server):
    body = {"prompt": " " * 16_000, "neg": " " * 16_000, **FAST, "num_steps": 1}
    answer, slowest = health_while(
        live_server, lambda: requests.post(f"{live_server}/generate", json=body, timeout=300)
    )
    assert answer.status_code == 200
    assert slowest < HEALTH_BOUND


def test_break_still_splits_a_prompt_and_eats_the_spaces_around_it():
    assert engine.prompts.parse_prompt_attention("a cat  BREAK  a dog") == [
        ("a cat", 1.0),
        ("BREAK", None),
        ("a dog", 1.0),
    ]
    assert engine.prompts.parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]


# ---- 6. an embedding of more than 75 vectors


@pytest.fixture
def long_embedding_engine(make_engine, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(76, 32)}, tmp_path / "embeddings" / "longwinded.safetensors")
    return make_engine(model="demo", models_dir=tmp_path)


@pytest.mark.parametrize(
    "route, body, status",
    [
        ("/generate", {"prompt": "a longwinded cat", **FAST}, 400),
        ("/v1/images/generations", {"prompt": "a longwinded cat", "size": "64x64", "steps": 1}, 400),
        ("/sdapi/v1/txt2img", {"prompt": "a longwinded cat", "width": 64, "height": 64, "steps": 1}, 422),
    ],
)
def test_an_embedding_of_more_than_75_vectors_is_refused_naming_it(long_embedding_engine, route, body, status, caplog):
    answer = imagine.create_app(long_embedding_engine).test_client().post(route, json=body)
    assert answer.status_code == status
    assert "embedding 'longwinded' has 76 vectors; at most 75 fit" in answer.get_data(as_text=True)
    assert not any(record.exc_info for record in caplog.records)  # no traceback in the log


# ---- 21.7 and 13d. one status for a bad value on the A1111 API: 422


def test_a_clip_skip_beyond_the_models_layers_is_a_422_on_the_a1111_api_like_every_bad_value(client):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "clip_skip": 12, "width": 64, "height": 64})
    assert answer.status_code == 422
    assert "clip_skip 12" in answer.get_json()["detail"]


def test_a_bad_value_of_the_options_or_png_info_is_a_422_on_the_a1111_api(client):
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": 5}).status_code == 422
    assert client.post("/sdapi/v1/png-info", json={"image": 5}).status_code == 422
    assert client.post("/sdapi/v1/txt2img", data="{", content_type="application/json").status_code == 422


# ---- 21.8 the 401 names both ways to send the key


def test_the_401_for_a_wrong_basic_credential_names_both_forms(make_engine):
    client = imagine.create_app(make_engine(model="demo", api_key="sesame")).test_client()
    wrong = base64.b64encode(b"user:wrong").decode()
    answer = client.get("/sdapi/v1/options", headers={"Authorization": f"Basic {wrong}"})
    assert answer.status_code == 401
    message = answer.get_json()["detail"]
    assert "Bearer <key>" in message and "Basic" in message and "password" in message


# ---- 8. an A1111 interrupt cuts only an A1111 picture, and a cut picture says so


@pytest.fixture
def held_server(make_engine, serve, hold):
    """A server whose engine can be held at a step (Hold.stop_at); yields (url, its Hold)."""
    held = hold()
    return serve(make_engine(model="demo", generate=held.generate)), held


def interrupted_while_held(held_server, call, how="interrupt"):
    """`call`'s answer, where A1111's interrupt or skip came while its generation was held before step 3."""
    url, held = held_server
    held.stop_at(3)
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=call()))
    thread.start()
    held.reached(3)
    assert requests.post(f"{url}/sdapi/v1/{how}", timeout=30).status_code == 200
    held.release()
    thread.join(120)
    return result["answer"]


@pytest.mark.parametrize("how", ["interrupt", "skip"])
def test_an_a1111_interrupt_or_skip_leaves_a_generate_or_openai_picture_whole(held_server, how):
    url = held_server[0]
    body = {"prompt": "a cat", **FAST, "num_steps": 8}
    whole = requests.post(f"{url}/generate", json=body, timeout=120).json()
    call = lambda: requests.post(f"{url}/generate", json=body, timeout=120)  # noqa: E731
    answer = interrupted_while_held(held_server, call, how).json()
    assert (answer["steps"], answer["interrupted"], answer["img"]) == (8, False, whole["img"])
    openai = {"prompt": "a cat", "size": "64x64", "steps": 8, "seed": 42}
    whole = requests.post(f"{url}/v1/images/generations", json=openai, timeout=120).json()
    call = lambda: requests.post(f"{url}/v1/images/generations", json=openai, timeout=120)  # noqa: E731
    answer = interrupted_while_held(held_server, call, how).json()
    assert answer["data"][0]["b64_json"] == whole["data"][0]["b64_json"]


def test_an_interrupted_a1111_picture_tells_its_real_steps_in_the_answer_and_the_png(held_server):
    url = held_server[0]
    body = {"prompt": "a cat", "seed": 5, "width": 64, "height": 64, "steps": 8}
    call = lambda: requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)  # noqa: E731
    answer = interrupted_while_held(held_server, call).json()
    info = json.loads(answer["info"])
    assert (info["steps"], info["interrupted"], answer["parameters"]["steps"]) == (3, True, 3)
    assert "Steps: 3," in info["infotexts"][0] and "Interrupted: after step 3 of 8" in info["infotexts"][0]
    assert decode_png(answer["images"][0]).info["parameters"] == info["infotexts"][0]
    whole = json.loads(requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120).json()["info"])
    assert (whole["steps"], whole["interrupted"]) == (8, False) and "Interrupted" not in whole["infotexts"][0]


# ---- 13b. a non-ASCII key as Python's requests sends it


def test_a_non_ascii_key_sent_as_requests_sends_it_latin1_is_accepted(make_engine, serve):
    url = serve(make_engine(model="demo", api_key="clé"))
    assert requests.get(f"{url}/samplers", auth=("user", "clé"), timeout=30).status_code == 200
    assert requests.get(f"{url}/samplers", headers={"Authorization": "Bearer clé"}, timeout=30).status_code == 200
    assert requests.get(f"{url}/samplers", auth=("user", "cle"), timeout=30).status_code == 401


# ---- 13c. /v1 errors name OpenAI's parameters


def test_openai_errors_name_the_openai_parameters(client):
    answer = client.post("/v1/images/generations", json={"prompt": "a cat", "steps": 1000})
    assert answer.get_json()["error"]["message"] == "steps must be between 1 and 150, not 1000"
    answer = client.post("/v1/images/generations", json={"prompt": "a cat", "negative_prompt": 5})
    assert answer.get_json()["error"]["message"] == "negative_prompt must be a string, not 5"


# ---- 13f. expired linked pictures


def test_expired_linked_pictures_are_dropped_when_the_next_is_kept():
    pictures = api.openai.LinkedPictures(seconds=-1)
    pictures.add(b"an old picture", "png")
    pictures.add(b"a new picture", "png")
    assert len(pictures.pictures) == 1


# ---- 13g. waitress's own error answers


def test_waitresss_own_error_answers_carry_the_security_headers(live_server):
    host, port = live_server.removeprefix("http://").split(":")
    import socket

    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413")
    for name, value in api.guard.SECURITY_HEADERS.items():
        assert f"{name}: {value}".encode() in answer


# ---- 13h. a DNS-rebinding page on a server open to the network without a key


@pytest.mark.parametrize(
    "host, status",
    [("evil.example:5000", 403), ("192.168.1.20:5000", 200), ("[fe80::1]:5000", 200), ("localhost:5000", 200)],
)
def test_on_all_addresses_without_a_key_a_host_that_is_no_name_of_this_machine_is_refused(make_engine, host, status):
    client = imagine.create_app(make_engine(model="demo", host="0.0.0.0")).test_client()
    assert client.get("/health", headers={"Host": host}).status_code == status


def test_on_all_addresses_the_machines_own_name_is_accepted_and_with_a_key_any_name(make_engine):
    import socket

    client = imagine.create_app(make_engine(model="demo", host="0.0.0.0")).test_client()
    assert client.get("/health", headers={"Host": f"{socket.gethostname()}:5000"}).status_code == 200
    keyed = imagine.create_app(make_engine(model="demo", host="0.0.0.0", api_key="k")).test_client()
    headers = {"Host": "my-box.example:5000", "Authorization": "Bearer k"}
    assert keyed.get("/health", headers=headers).status_code == 200
