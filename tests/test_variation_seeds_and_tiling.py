"""A1111's variation seeds and tiling on the tiny model: a variation seed blends another seed's noise in (strength 1 is
that seed's picture), a batch keeps its seed and counts up its variation seeds, the picture's data pastes back to the
same picture; tiling draws a picture whose edges meet, for that request alone; bad values are refused naming the
field, and the flow-matching families refuse what they cannot draw."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, assert_same_picture, decode_png, pixels

import imagine
from engine.errors import ImagineError
from engine.files.families import FAMILIES
from engine.noise import PictureNoise
from engine.request import for_family, parse_request

EULER = {**FAST, "prompt": "a tiled floor", "sampler": "euler"}  # no step noise: the starting noise alone decides


def draw(client, **fields) -> dict:
    answer = client.post("/generate", json={**EULER, **fields})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def picture(client, **fields) -> np.ndarray:
    return pixels(draw(client, **fields)["img"])


def test_variation_strength_0_draws_the_seeds_picture_1_the_variation_seeds_and_between_another(client):
    seed, other = picture(client, seed=5), picture(client, seed=9)
    assert_same_picture(picture(client, seed=5, variation_seed=9, variation_strength=0.0), seed)
    assert_same_picture(picture(client, seed=5, variation_seed=9, variation_strength=1.0), other)
    between = picture(client, seed=5, variation_seed=9, variation_strength=0.3).astype(int)
    assert np.abs(between - seed).mean() > 1 and np.abs(between - other).mean() > 1


def test_a_variation_batch_keeps_its_seed_and_picture_k_is_its_variation_seed_plus_k_drawn_alone(client):
    batch = draw(client, seed=5, variation_seed=9, variation_strength=0.5, n=2)
    assert batch["seeds"] == [5, 5]
    alone = picture(client, seed=5, variation_seed=10, variation_strength=0.5)
    assert_same_picture(pixels(batch["images"][1]), alone)
    text = decode_png(batch["images"][1]).info["parameters"]
    assert "Seed: 5, " in text and "Variation seed: 10, Variation seed strength: 0.5" in text
    again = client.post("/generate", json={"parameters": text}).get_json()  # pasted back: the same picture
    assert_same_picture(pixels(again["img"]), alone)
    assert again["parameters_ignored"] == []


def test_a_random_variation_seed_is_drawn_where_only_a_strength_is_given_and_recorded(client):
    text = decode_png(draw(client, variation_strength=0.2)["img"]).info["parameters"]
    recorded = int(text.split("Variation seed: ")[1].split(",")[0])
    assert_same_picture(
        picture(client, variation_seed=recorded, variation_strength=0.2), picture(client, parameters=text)
    )


def test_resizing_the_seed_from_the_size_drawn_changes_nothing_and_from_another_size_changes_the_picture(client):
    plain = picture(client)
    assert_same_picture(picture(client, seed_resize_from_width=64, seed_resize_from_height=64), plain)
    resized = picture(client, seed_resize_from_width=128, seed_resize_from_height=64)
    assert np.abs(resized.astype(int) - plain).mean() > 1


class RolledNoise(PictureNoise):
    """The seeds' noise with the starting noise rolled 2 latent pixels (16 pixels) across and 2 down."""

    def next(self):
        started, noise = self.started, super().next()
        return noise if started else torch.roll(noise, (2, 2), dims=(2, 3))


def test_a_tiled_picture_wraps_round_its_edges_so_rolling_its_noise_rolls_the_picture(make_engine, monkeypatch):
    """With circular padding the picture is drawn on a torus: its left edge continues its right one, so noise moved
    across the edge draws the same picture moved across it (the demo UNet halves the latents once: 2 latent pixels
    move every part of it alike). Without tiling the edges are edges, and the moved picture is another. In float32:
    bfloat16 rounds sums taken in another order too far apart to compare."""
    client = imagine.create_app(make_engine(model="demo", fp_prec="32")).test_client()
    tiled, plain = picture(client, tiling=True), picture(client)
    monkeypatch.setattr("engine.pipeline.PictureNoise", RolledNoise)
    assert_same_picture(picture(client, tiling=True), np.roll(tiled, (16, 16), axis=(0, 1)))
    assert np.abs(picture(client).astype(int) - np.roll(plain, (16, 16), axis=(0, 1))).mean() > 1


def test_tiling_is_for_its_request_alone_and_for_every_picture_of_a_batch(client):
    before = picture(client, seed=3)
    batch = draw(client, seed=3, n=2, tiling=True)
    assert_same_picture(pixels(batch["images"][1]), picture(client, seed=4, tiling=True))
    assert np.abs(pixels(batch["images"][0]).astype(int) - before).mean() > 1
    assert "Tiling: True" in decode_png(batch["images"][0]).info["parameters"]
    assert_same_picture(picture(client, seed=3), before)  # the model's convolutions pad with zeros again


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"variation_strength": 1.5}, "variation_strength", "variation_strength must be between 0.0 and 1.0, not 1.5"),
        ({"variation_seed": 2**64}, "variation_seed", "variation_seed must be between 0 and"),
        ({"seed_resize_from_width": 512}, "seed_resize_from_height", "needs seed_resize_from_height beside it"),
        ({"seed_resize_from_width": 500, "seed_resize_from_height": 512}, "seed_resize_from_width", "multiple of 8"),
        ({"seed_resize_from_width": 64, "seed_resize_from_height": 8}, "seed_resize_from_height", "between 16 and"),
        ({"tiling": "yes"}, "tiling", 'tiling must be true or false, not "yes"'),
    ],
)
def test_bad_variation_and_tiling_values_are_refused_naming_the_field(client, fields, field, message):
    answer = client.post("/generate", json={**EULER, **fields})
    assert answer.status_code == 400 and message in answer.get_json()["error"]
    with pytest.raises(ImagineError) as error:
        parse_request({**EULER, **fields})
    assert error.value.field == field


def test_a1111s_subseed_strength_outside_0_to_1_is_a_422_naming_it(client):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "subseed_strength": 2, "width": 64})
    assert answer.status_code == 422 and "subseed_strength must be between 0.0 and 1.0, not 2" in json.dumps(
        answer.get_json()
    )


def test_a1111s_variation_seeds_and_tiling_draw_and_are_reported_as_a1111_reports_them(client):
    body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": 5, "batch_size": 2, "subseed": 9}
    body |= {"subseed_strength": 0.5, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "tiling": True}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).get_json()["info"])
    assert (info["all_seeds"], info["all_subseeds"], info["subseed_strength"]) == ([5, 5], [9, 10], 0.5)
    assert info["imagine_ignored"] == []
    assert "Variation seed: 10, Variation seed strength: 0.5" in info["infotexts"][1]
    assert info["infotexts"][1].endswith("Tiling: True")


@pytest.mark.parametrize("family", ["z-image", "flux1-dev", "flux2-klein"])
@pytest.mark.parametrize(
    "fields, field",
    [({"tiling": True}, "tiling"), ({"variation_strength": 0.5}, "variation_strength")]
    + [({"seed_resize_from_width": 512, "seed_resize_from_height": 512}, "seed_resize_from_width")],
)
def test_the_flow_families_refuse_tiling_and_variation_seeds_naming_the_field(family, fields, field):
    with pytest.raises(ImagineError) as error:
        for_family(parse_request({"prompt": "a fox", **fields}), FAMILIES[family], 2048)
    assert error.value.field == field and FAMILIES[family].label in error.value.message
