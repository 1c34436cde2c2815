"""What SillyTavern and Open WebUI send that A1111 and OpenAI answer (issue 21): Forge's module list on Connect,
and sizes that are not multiples of 8, drawn rounded down as A1111 draws them."""

import json

from conftest import decode_png


def test_sillytaverns_connect_gets_forges_empty_module_list_and_logs_no_warning(client, caplog):
    with caplog.at_level("INFO", logger="imagine"):
        response = client.get("/sdapi/v1/sd-modules")
    assert response.status_code == 200
    assert response.get_json() == []
    assert [record.levelname for record in caplog.records] == ["INFO"]


# Open WebUI lets its users type any size; these are its engines' bodies for 500x500 (with one step, to be quick).
OPEN_WEBUI_A1111_BODY = {"prompt": "a cat", "batch_size": 1, "width": 500, "height": 500, "steps": 1}
OPEN_WEBUI_OPENAI_BODY = {
    "model": "dall-e-2",
    "prompt": "a cat",
    "n": 1,
    "size": "500x500",
    "response_format": "b64_json",
    "steps": 1,
}


def test_a1111_draws_a_size_that_is_no_multiple_of_8_rounded_down_and_its_info_says_the_size_drawn(client):
    response = client.post("/sdapi/v1/txt2img", json=OPEN_WEBUI_A1111_BODY)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert decode_png(answer["images"][0]).size == (496, 496)
    info = json.loads(answer["info"])
    assert (info["width"], info["height"]) == (496, 496)
    assert (answer["parameters"]["width"], answer["parameters"]["height"]) == (496, 496)
    assert "Size: 496x496" in info["infotexts"][0]


def test_openai_draws_a_size_that_is_no_multiple_of_8_rounded_down_and_answers_the_size_drawn(client):
    response = client.post("/v1/images/generations", json=OPEN_WEBUI_OPENAI_BODY)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert decode_png(answer["data"][0]["b64_json"]).size == (496, 496)
    assert answer["size"] == "496x496"


def test_openai_rounds_each_side_on_its_own_and_still_refuses_a_size_below_the_smallest(client):
    fields = {**OPEN_WEBUI_OPENAI_BODY, "size": "70x130"}
    answer = client.post("/v1/images/generations", json=fields).get_json()
    assert answer["size"] == "64x128"
    refused = client.post("/v1/images/generations", json={**fields, "size": "60x64"})
    assert refused.status_code == 400
    assert "width must be between 64 and" in refused.get_json()["error"]["message"]


def test_generate_stays_strict_about_multiples_of_8(client):
    response = client.post("/generate", json={"prompt": "a cat", "width": 500, "height": 500, "num_steps": 1})
    assert response.status_code == 400
    assert response.get_json()["error"] == "width must be a multiple of 8, not 500"
