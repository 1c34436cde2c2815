"""Seeds as A1111 takes them (0 to 2**64 - 1, -1 for random) and the noise source (`rng`) on /generate."""

import numpy as np
import pytest
from conftest import FAST, assert_same_picture, decode_png, pixels

TOP = 2**64 - 1


def post(client, **fields):
    return client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})


def generate(client, **fields):
    response = post(client, **fields)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_any_64_bit_seed_draws_and_is_recorded_exactly(client):
    answer = generate(client, seed=TOP)
    assert answer["seed"] == TOP
    assert f"Seed: {TOP}," in decode_png(answer["img"]).info["parameters"]


def test_a_batch_near_the_top_gets_seed_plus_k_and_picture_k_is_the_one_its_seed_alone_draws(client):
    batch = generate(client, seed=TOP - 1, n=2)
    assert batch["seeds"] == [TOP - 1, TOP]
    alone = generate(client, seed=TOP)
    assert_same_picture(pixels(batch["images"][1]), pixels(alone["img"]))


def test_a_batch_whose_seeds_would_pass_the_top_is_refused_naming_the_last_seed_it_may_start_at(client):
    response = post(client, seed=TOP, n=2)
    assert response.status_code == 400
    assert f"give a seed at most {TOP - 1}" in response.get_json()["error"]


@pytest.mark.parametrize("seed", [TOP + 1, 2**70, -2])
def test_a_seed_beyond_64_bits_or_below_minus_one_is_refused(client, seed):
    response = post(client, seed=seed)
    assert response.status_code == 400
    assert f"seed must be between 0 and {TOP}" in response.get_json()["error"]


def test_nv_noise_draws_another_picture_than_cpu_noise_and_gpu_is_the_same_noise(client):
    cpu, nv, gpu = (generate(client, seed=11, rng=rng) for rng in ("cpu", "nv", "gpu"))
    assert not np.array_equal(pixels(cpu["img"]), pixels(nv["img"]))
    assert np.array_equal(pixels(nv["img"]), pixels(gpu["img"]))


def test_the_picture_records_its_rng_as_a1111_writes_it(client):
    def recorded(rng):
        return decode_png(generate(client, rng=rng)["img"]).info["parameters"]

    assert "RNG: CPU" in recorded("cpu")
    assert "RNG: NV" in recorded("nv")
    assert "RNG:" not in recorded("gpu")  # A1111's default, which it never writes


def test_an_unknown_rng_is_refused_listing_the_sources(client):
    response = post(client, rng="quantum")
    assert response.status_code == 400
    assert response.get_json()["error"] == "rng must be one of: cpu, gpu, nv, not 'quantum'"


@pytest.mark.parametrize("sampler", ["euler a", "dpm++ sde", "dpm2 a"])
def test_the_step_noise_of_a_batch_picture_is_its_own_seeds(client, sampler):
    batch = generate(client, sampler=sampler, seed=20, n=2, rng="nv")
    alone = generate(client, sampler=sampler, seed=21, rng="nv")
    assert_same_picture(pixels(batch["images"][1]), pixels(alone["img"]))


def test_the_servers_rng_setting_is_the_default_a_request_can_override(make_engine):
    import imagine

    client = imagine.create_app(make_engine(model="demo", rng="nv")).test_client()
    nv = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST}).get_json()
    assert "RNG: NV" in decode_png(nv["img"]).info["parameters"]
    cpu = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, "rng": "cpu"}).get_json()
    assert "RNG: CPU" in decode_png(cpu["img"]).info["parameters"]
    assert imagine.parse_settings(["--rng", "gpu"]).rng == "gpu"
