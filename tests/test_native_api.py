"""POST /generate on the tiny demo model: every field, streaming, reproducibility and errors."""

import itertools
import json

import numpy as np
import pytest
from conftest import FAST, decode_png, pixels, png_data
from PIL import Image

import imagine
from engine import pipeline
from engine.ksampling import KDiffusionScheduler
from engine.samplers import SAMPLER_NAMES


def generate(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def stream_lines(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def test_txt2img_answers_a_png_of_the_requested_size_with_its_seed(client):
    answer = generate(client, width=96, height=64, seed=7)
    assert decode_png(answer["img"]).size == (96, 64)
    assert answer["seed"] == 7
    assert answer["model"] == "demo"
    assert (answer["width"], answer["height"], answer["steps"]) == (96, 64, 4)


def test_default_size_is_512_square(client):
    answer = generate(client, width=None, height=None, num_steps=1)
    assert decode_png(answer["img"]).size == (512, 512)


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", "a red bicycle in the snow"),
        ("neg", "blurry"),
        ("num_steps", 6),
        ("guidance", 2.0),
        ("sampler", "euler a"),
        ("seed", 43),
        ("model", "tiny"),
    ],
)
def test_each_field_changes_the_picture(client, field, value):
    baseline = pixels(generate(client)["img"])
    changed = pixels(generate(client, **{field: value})["img"])
    assert np.abs(baseline - changed).mean() > 0.5


def test_left_out_fields_take_the_documented_defaults(client):
    """25 steps, guidance 7, 'dpm++ 2m', no negative prompt; for img2img, strength 0.8."""
    stated = {"num_steps": 25, "guidance": 7.0, "sampler": "dpm++ 2m", "neg": ""}
    implicit = generate(client, num_steps=None)
    assert np.array_equal(pixels(implicit["img"]), pixels(generate(client, **stated)["img"]))
    img = png_data(noise_image(5))
    implicit = generate(client, img=img)
    assert np.array_equal(pixels(implicit["img"]), pixels(generate(client, img=img, strength=0.8)["img"]))


def test_same_seed_and_parameters_give_identical_pixels(client):
    first = generate(client, seed=1234, sampler="euler a")
    second = generate(client, seed=1234, sampler="euler a")
    assert np.array_equal(pixels(first["img"]), pixels(second["img"]))


def test_a_missing_seed_is_chosen_at_random_and_reported_so_the_picture_can_be_repeated(client):
    first = generate(client, seed=None)
    second = generate(client, seed=None)
    assert first["seed"] != second["seed"]
    again = generate(client, seed=first["seed"])
    assert np.array_equal(pixels(first["img"]), pixels(again["img"]))


@pytest.mark.parametrize("sampler", list(SAMPLER_NAMES))
def test_every_sampler_runs_whatever_the_case_of_its_name(client, sampler):
    answer = generate(client, sampler=sampler.upper())
    assert decode_png(answer["img"]).size == (64, 64)


@pytest.mark.parametrize("sampler", list(SAMPLER_NAMES))
def test_each_sampler_name_runs_its_scheduler(client, engine, sampler):
    generate(client, sampler=sampler)
    scheduler = engine.models.get("demo").txt2img.scheduler
    if sampler == "lcm":
        assert type(scheduler).__name__ == "LCMScheduler"
    else:
        assert isinstance(scheduler, KDiffusionScheduler) and scheduler.config.sampler == sampler


def test_every_sampler_gives_a_different_picture(client):
    pictures = [pixels(generate(client, sampler=name)["img"]) for name in SAMPLER_NAMES]
    for i, a in enumerate(pictures):
        for b in pictures[i + 1 :]:
            assert not np.array_equal(a, b)


def test_second_order_samplers_report_model_evaluations_as_steps(client):
    assert generate(client, sampler="euler")["steps"] == 4
    assert generate(client, sampler="heun")["steps"] == 7


# ---- img2img


def noise_image(seed, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def test_img2img_follows_strength_the_lower_the_more_the_input_shows_through(client):
    """Two different inputs give pictures that differ less and less as strength rises."""
    a, b = png_data(noise_image(1)), png_data(Image.new("RGB", (64, 64), (200, 30, 30)))
    distances = []
    for strength in (0.2, 0.6, 1.0):
        from_a = pixels(generate(client, img=a, strength=strength, num_steps=10)["img"])
        from_b = pixels(generate(client, img=b, strength=strength, num_steps=10)["img"])
        distances.append(np.abs(from_a - from_b).mean())
    assert distances[0] > distances[1] > distances[2]


def test_img2img_runs_strength_times_num_steps_steps(client):
    assert generate(client, img=png_data(noise_image(1)), strength=0.5, num_steps=10)["steps"] == 5


def test_img_accepts_a_data_uri_or_bare_base64(client):
    data = png_data(noise_image(2))
    bare = generate(client, img=data, strength=0.5)
    uri = generate(client, img="data:image/png;base64," + data, strength=0.5)
    assert np.array_equal(pixels(bare["img"]), pixels(uri["img"]))


def test_img2img_keeps_the_input_size_unless_width_and_height_are_given(client):
    data = png_data(noise_image(3, size=(100, 70)))
    assert decode_png(generate(client, img=data, width=None, height=None)["img"]).size == (96, 64)
    assert decode_png(generate(client, img=data, width=64, height=128)["img"]).size == (64, 128)


@pytest.mark.parametrize("size", [(40, 40), (3000, 200)])
def test_an_input_image_outside_the_size_limits_needs_width_and_height(client, size):
    data = png_data(Image.new("RGB", size))
    response = client.post("/generate", json={"prompt": "x", "img": data, "num_steps": 2})
    assert response.status_code == 400
    assert f"img is {size[0]}x{size[1]}" in response.get_json()["error"]
    assert decode_png(generate(client, img=data, width=64, height=64)["img"]).size == (64, 64)


def test_img_may_be_wrapped_across_lines_as_the_base64_command_writes_it(client):
    data = png_data(noise_image(2))
    wrapped = "\n".join(data[i : i + 76] for i in range(0, len(data), 76))
    assert np.array_equal(pixels(generate(client, img=wrapped)["img"]), pixels(generate(client, img=data)["img"]))


def test_a_decompression_bomb_is_refused_with_400(client):
    bomb = png_data(Image.new("1", (20000, 20000)))  # a few kB of PNG, 400 million pixels decoded
    response = client.post("/generate", json={"prompt": "x", "img": bomb})
    assert response.status_code == 400
    assert "img" in response.get_json()["error"]


# ---- streaming


def test_stream_sends_a_preview_every_n_steps_then_the_final_picture(client):
    lines = stream_lines(client, num_steps=10, stream=3, seed=5)
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert [line["step"] for line in lines[:-1]] == [3, 6, 9]
    for line in lines[:-1]:
        assert line["steps"] == 10 and line["seed"] == 5
        assert decode_png(line["img"]).size == (64, 64)
    assert lines[-1]["seed"] == 5 and decode_png(lines[-1]["img"]).size == (64, 64)


def test_streamed_final_picture_equals_the_unstreamed_one(client):
    streamed = stream_lines(client, stream=1, seed=9)[-1]
    plain = generate(client, seed=9)
    assert np.array_equal(pixels(streamed["img"]), pixels(plain["img"]))


def test_stream_zero_or_null_answers_one_json_object(client):
    for stream in (0, None):
        response = client.post("/generate", json={"prompt": "x", **FAST, "stream": stream})
        assert response.mimetype == "application/json"
        assert "img" in response.get_json()


def test_previews_show_the_picture_forming(client):
    """Each line's picture differs from the one before: the stream shows progress, not repeats."""
    lines = stream_lines(client, num_steps=8, stream=2)
    images = [pixels(line["img"]) for line in lines]
    for earlier, later in itertools.pairwise(images):
        assert not np.array_equal(earlier, later)


# ---- errors


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "prompt is required"),
        ({"prompt": 5}, "prompt must be a string, not 5"),
        ({"prompt": "x", "width": 100}, "width must be a multiple of 8, not 100"),
        ({"prompt": "x", "width": 4096}, "width must be between 64 and 2048, not 4096"),
        ({"prompt": "x", "height": "512"}, 'height must be an integer, not "512"'),
        ({"prompt": "x", "height": 512.5}, "height must be an integer, not 512.5"),
        ({"prompt": "x", "num_steps": 0}, "num_steps must be between 1 and 150, not 0"),
        ({"prompt": "x", "num_steps": True}, "num_steps must be an integer, not true"),
        ({"prompt": "x", "guidance": float("nan")}, "guidance must be between 0.0 and 30.0, not nan"),
        ({"prompt": "x", "guidance": -1}, "guidance must be between 0.0 and 30.0, not -1"),
        ({"prompt": "x", "sampler": "plms"}, "sampler 'plms' is unknown"),
        ({"prompt": "x", "seed": -2}, "seed must be between 0 and 18446744073709551615, not -2"),  # -1: random
        ({"prompt": "x", "seed": 2**64}, f"seed must be between 0 and 18446744073709551615, not {2**64}"),
        ({"prompt": "x", "neg": ["a"]}, 'neg must be a string, not ["a"]'),
        ({"prompt": "x", "img": "not base64!"}, "img is not valid base64"),
        ({"prompt": "x", "img": "aGVsbG8="}, "img is not a picture in a format accepted"),
        ({"prompt": "x", "img": "data:text/plain,hello"}, "img must be a base64 data URI"),
        ({"prompt": "x", "strength": 1.5}, "strength must be between 0.0 and 1.0, not 1.5"),
        ({"prompt": "x", "stream": "yes"}, 'stream must be an integer, not "yes"'),
        ({"prompt": "x", "model": 3}, "model must be a string, not 3"),
        ({"prompt": "x", "model": ""}, "model must name a model"),
        ({"prompt": "x", "negative": "ugly"}, "unknown field 'negative'"),
    ],
)
def test_a_bad_field_answers_400_naming_the_field_and_value(client, body, message):
    response = client.post("/generate", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_strength_too_low_to_run_a_step_is_refused_before_any_work(client):
    img = png_data(noise_image(4))
    response = client.post("/generate", json={"prompt": "x", "img": img, "strength": 0.05, "num_steps": 10})
    assert response.status_code == 400
    assert "strength" in response.get_json()["error"]


def test_an_unknown_model_answers_404_without_server_paths(client, models_dir):
    response = client.post("/generate", json={"prompt": "x", "model": "no-such-model"})
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert "no-such-model" in error and str(models_dir) not in error


def test_wrong_method_answers_405_json_saying_what_is_allowed(client):
    response = client.get("/generate")
    assert response.status_code == 405 and "error" in response.get_json()
    assert "POST" in response.headers["Allow"]


def test_a_body_that_is_not_json_answers_415(client):
    response = client.post("/generate", data="prompt=a cat", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and "application/json" in response.get_json()["error"]


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", "null"])
def test_malformed_json_answers_400(client, data):
    response = client.post("/generate", data=data, content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.get_json()["error"]


def test_an_unknown_path_answers_404_json(client):
    response = client.get("/nothing-here")
    assert response.status_code == 404 and "error" in response.get_json()


def test_a_failure_inside_a_generation_answers_json_500_and_the_server_keeps_serving(make_engine):
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return pipeline.generate(*args, **kwargs)

    client = imagine.create_app(make_engine(model="demo", generate=fails_once)).test_client()
    response = client.post("/generate", json={"prompt": "x", **FAST})
    assert response.status_code == 500
    assert "out of memory" in response.get_json()["error"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200


def test_a_failure_after_the_stream_started_ends_it_with_an_error_line(make_engine):
    def fails_after_step_two(model, req, on_step=None, conditioning=None):
        def failing_on_step(step, steps, latents):
            on_step(step, steps, latents)
            if step == 2:
                raise RuntimeError("device lost (injected)")

        return pipeline.generate(model, req, failing_on_step, conditioning)

    client = imagine.create_app(make_engine(model="demo", generate=fails_after_step_two)).test_client()
    lines = stream_lines(client, num_steps=6, stream=1)
    assert [line.get("step") for line in lines[:-1]] == [1, 2]
    assert lines[-1]["done"] is True and "device lost" in lines[-1]["error"]
