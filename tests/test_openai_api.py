"""OpenAI's Images API under /v1, driven by the official openai package against the real waitress server."""

import base64
import io
import logging

import openai
import pytest
import requests
from conftest import (
    FAST,
    assert_same_picture,
    noise_picture,
    pixels,
    png_data,
    post_in_background,
    square_mask,
    wait_until,
)
from PIL import Image

# Imagine's knobs, as the SDK sends them: extra fields beside OpenAI's.
QUICK = {"steps": 4, "seed": 42}


@pytest.fixture
def sdk(live_server):
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def picture(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_file(image: Image.Image) -> tuple:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ("picture.png", buffer.getvalue(), "image/png")


def generate(live_server, **body) -> dict:
    return requests.post(f"{live_server}/generate", json={"prompt": "a cat", **FAST, **body}, timeout=120).json()


# ---- generations


def test_n_pictures_are_the_pictures_generate_draws_with_seeds_seed_plus_k(sdk, live_server):
    answer = sdk.images.generate(prompt="a cat", n=2, size="64x64", extra_body=QUICK)
    assert [image.revised_prompt for image in answer.data] == [None, None]
    assert (answer.size, answer.output_format, answer.background) == ("64x64", "png", "opaque")
    batch = generate(live_server, n=2)
    assert [image.b64_json for image in answer.data] == batch["images"]


def test_size_sets_width_and_height(sdk):
    answer = sdk.images.generate(prompt="a cat", size="64x128", extra_body=QUICK)
    assert picture(answer.data[0].b64_json).size == (64, 128)


@pytest.mark.parametrize("size", ["60x64", "64", "4096x4096"])  # one that is no multiple of 8 is rounded down
def test_a_size_that_is_no_size_or_out_of_range_is_a_bad_request_naming_it(sdk, size):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="a cat", size=size, extra_body=QUICK)
    assert refused.value.status_code == 400
    assert refused.value.body["message"].startswith("size") and repr(size) in refused.value.body["message"]
    assert refused.value.body["type"] == "invalid_request_error"


def test_quality_picks_the_documented_number_of_steps(sdk):
    answer = sdk.images.generate(prompt="a cat", size="64x64", quality="low", extra_body={"seed": 1})
    assert "Steps: 12," in picture(answer.data[0].b64_json).info["parameters"]


@pytest.mark.parametrize(("output_format", "pillow_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_format_gives_that_kind_of_file(sdk, output_format, pillow_format):
    answer = sdk.images.generate(
        prompt="a cat", size="64x64", output_format=output_format, output_compression=50, extra_body=QUICK
    )
    assert answer.output_format == output_format
    assert picture(answer.data[0].b64_json).format == pillow_format


def test_a_lower_output_compression_gives_a_smaller_jpeg(sdk):
    sizes = [
        len(sdk.images.generate(prompt="a cat", size="64x64", output_format="jpeg", output_compression=quality,
                                extra_body=QUICK).data[0].b64_json)
        for quality in (10, 95)
    ]  # fmt: skip
    assert sizes[0] < sizes[1]


def test_response_format_url_links_to_the_picture_on_this_server(sdk, live_server):
    answer = sdk.images.generate(prompt="a cat", size="64x64", response_format="url", n=2, extra_body=QUICK)
    links = [image.url for image in answer.data]
    assert all(link.startswith(f"{live_server}/v1/images/files/") for link in links)
    assert len(set(links)) == 2
    fetched = requests.get(links[0], timeout=30)
    assert fetched.headers["Content-Type"] == "image/png"
    # The first picture of the batch is the picture its seed draws alone (up to a batch's float rounding).
    assert_same_picture(pixels(base64.b64encode(fetched.content).decode()), pixels(generate(live_server)["img"]))


def test_an_unknown_picture_link_is_a_404_in_openais_shape(live_server):
    response = requests.get(f"{live_server}/v1/images/files/guessed.png", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_model_names_imagine_lacks_fall_back_to_the_default_model_logged_once(sdk, live_server, caplog):
    caplog.set_level(logging.INFO)
    answers = [sdk.images.generate(model="dall-e-3", prompt="a cat", size="64x64", extra_body=QUICK) for _ in range(2)]
    assert answers[0].data[0].b64_json == generate(live_server)["img"]
    assert sum("'dall-e-3' is not here" in record.getMessage() for record in caplog.records) == 1


def test_a_model_imagine_has_is_used(sdk, live_server):
    answer = sdk.images.generate(model="tiny", prompt="a cat", size="64x64", extra_body=QUICK)
    assert answer.data[0].b64_json == generate(live_server, model="tiny")["img"]
    assert answer.data[0].b64_json != generate(live_server)["img"]


def test_imagines_knobs_come_as_extra_fields(sdk, live_server):
    knobs = {"negative_prompt": "blurry", "guidance": 3.0, "sampler": "euler", "clip_skip": 2}
    answer = sdk.images.generate(prompt="a cat", size="64x64", extra_body={**QUICK, **knobs})
    same = generate(live_server, neg="blurry", guidance=3.0, sampler="euler", clip_skip=2)
    assert answer.data[0].b64_json == same["img"]


def test_moderation_style_and_user_are_accepted_and_ignored(sdk, live_server):
    answer = sdk.images.generate(
        prompt="a cat", size="64x64", moderation="low", style="vivid", user="me", background="opaque", extra_body=QUICK
    )
    assert answer.data[0].b64_json == generate(live_server)["img"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"background": "transparent"}, "background 'transparent' is not supported"),
        ({"quality": "ultra"}, "quality must be one of"),
        ({"response_format": "file"}, "response_format must be"),
        ({"output_format": "gif"}, "output_format must be"),
        ({"n": 20}, "n must be between 1 and 8, not 20"),
        ({"partial_images": 4}, "partial_images must be between 0 and 3"),
        ({"extra_body": {"steps": 0}}, "steps must be between 1 and 150, not 0"),  # the name the client sent
        ({"extra_body": {"sampler": "nope"}}, "sampler 'nope' is unknown"),
        ({"extra_body": {"stpes": 4}}, "unknown parameter 'stpes'"),
    ],
)
def test_bad_fields_are_bad_requests_that_say_what_is_wrong(sdk, fields, words):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="a cat", size="64x64", **fields)
    assert words in refused.value.body["message"]


# ---- streaming


def test_streaming_sends_partial_images_spread_over_the_run_then_the_picture(sdk, live_server):
    events = list(
        sdk.images.generate(
            prompt="a cat", size="64x64", stream=True, partial_images=2, extra_body={**QUICK, "steps": 6}
        )
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert all(picture(event.b64_json).size == (64, 64) for event in events)
    assert (events[-1].size, events[-1].output_format, events[-1].usage.total_tokens) == ("64x64", "png", 0)
    assert events[-1].b64_json == generate(live_server, num_steps=6)["img"]


def test_streaming_without_partial_images_sends_only_the_picture(sdk):
    events = list(sdk.images.generate(prompt="a cat", size="64x64", stream=True, extra_body=QUICK))
    assert [event.type for event in events] == ["image_generation.completed"]


def test_a_streaming_client_that_leaves_cancels_its_generation(make_engine, serve, hold):
    held = hold(10)
    engine = make_engine(model="demo", generate=held.generate)
    sdk = openai.OpenAI(base_url=f"{serve(engine)}/v1", api_key="unused", max_retries=0)
    stream = sdk.images.generate(
        prompt="a cat", size="64x64", stream=True, partial_images=3, extra_body={**QUICK, "steps": 30}
    )
    next(iter(stream))  # the first partial image, at step 8 of 30
    stream.close()
    held.release()
    wait_until(lambda: engine.running is None and engine.unfinished == 0, "the generation stops")
    assert max(held.steps) < 30


# ---- edits


def test_an_edit_without_a_mask_is_image_to_image(sdk, live_server):
    image = noise_picture()
    answer = sdk.images.edit(image=png_file(image), prompt="a cat", extra_body={**QUICK, "strength": 0.5})
    assert picture(answer.data[0].b64_json).size == (64, 64)
    same = generate(live_server, img=png_data(image), strength=0.5, width=None, height=None)
    assert answer.data[0].b64_json == same["img"]


def test_an_edit_with_a_mask_repaints_its_transparent_pixels(sdk, live_server):
    image = noise_picture()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (24, 24, 40, 40))
    answer = sdk.images.edit(image=png_file(image), mask=png_file(mask), prompt="a red ball", n=2, extra_body=QUICK)
    same = generate(live_server, prompt="a red ball", img=png_data(image), mask=png_data(square_mask()), n=2,
                    width=None, height=None)  # fmt: skip
    assert [image.b64_json for image in answer.data] == same["images"]


def test_an_edit_streams_image_edit_events(sdk):
    stream = sdk.images.edit(image=png_file(noise_picture()), prompt="a cat", stream=True, partial_images=1,
                             extra_body={**QUICK, "steps": 8})  # fmt: skip
    assert [event.type for event in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_loras_in_an_edit_arrive_in_the_sdks_flattened_form(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(
            image=png_file(noise_picture()), prompt="a cat", extra_body={"loras": [{"name": "nope", "weight": 0.5}]}
        )
    assert "lora 'nope' not found" in refused.value.body["message"]


def test_an_edit_with_several_images_is_refused_saying_one_at_a_time(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(image=[png_file(noise_picture()), png_file(noise_picture(seed=1))], prompt="a cat")
    assert "one picture at a time" in refused.value.body["message"]


def test_an_upload_that_is_no_picture_is_a_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(image=("notes.png", b"just text", "image/png"), prompt="a cat")
    assert "image is not a picture" in refused.value.body["message"]


def test_a_mask_without_transparent_pixels_is_a_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(image=png_file(noise_picture()), mask=png_file(Image.new("RGB", (64, 64))), prompt="a cat")
    assert "mask has no transparent pixels" in refused.value.body["message"]


def test_an_upload_over_the_body_limit_is_a_413(make_engine, serve, monkeypatch):
    monkeypatch.setattr("api.native.MAX_BODY_BYTES", 2**20)
    sdk = openai.OpenAI(base_url=f"{serve(make_engine(model='demo'))}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.images.edit(image=("big.png", bytes(3 * 2**19), "image/png"), prompt="a cat")
    assert refused.value.status_code == 413
    assert refused.value.body["type"] == "invalid_request_error"


# ---- models, keys, a full queue


def test_models_lists_the_default_and_the_models_folders(sdk):
    models = [model.id for model in sdk.models.list()]
    assert models[0] == "demo"
    assert "tiny" in models


def test_a_route_imagine_lacks_is_a_not_found_error(sdk):
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.models.retrieve("demo")
    assert refused.value.body["type"] == "invalid_request_error"


def test_with_an_api_key_a_wrong_key_is_an_authentication_error(make_engine, serve):
    url = serve(make_engine(model="demo", api_key="secret"))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0).models.list().data


def test_a_full_queue_is_a_503_with_retry_after(make_engine, serve, hold):
    held = hold(1)
    engine = make_engine(model="demo", max_queue=0, generate=held.generate)
    url = serve(engine)
    results = []
    running = post_in_background(url, {"prompt": "x", **FAST}, results)
    wait_until(lambda: engine.running is not None, "the first request runs")
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as refused:
        sdk.images.generate(prompt="a cat", size="64x64", extra_body=QUICK)
    assert refused.value.status_code == 503
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert "busy" in refused.value.body["message"]
    held.release()
    running.join()
    assert results[0][0] == 200


def test_loras_in_an_edit_may_be_json_text_and_text_that_is_no_list_is_refused(sdk):
    for loras, words in [('[{"name": "nope"}]', "lora 'nope' not found"), ("nope", "loras must be a list")]:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.images.edit(image=png_file(noise_picture()), prompt="a cat", extra_body={"loras": loras})
        assert words in refused.value.body["message"]


def test_an_error_found_while_drawing_names_the_field_as_openais_clients_send_it(sdk):
    # The negative prompt's length in tokens is known only once the model's tokenizer reads it, on the engine's thread.
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="a cat", size="64x64", extra_body={**QUICK, "negative_prompt": "a " * 7500})
    message = refused.value.body["message"]
    assert message.startswith("negative_prompt is 100 chunks of 75 tokens"), message
