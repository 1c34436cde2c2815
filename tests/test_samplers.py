"""Karras variants, 'dpm++ 2m sde', and GET /samplers, on the tiny demo model."""

import numpy as np
import pytest
from conftest import FAST, pixels

import imagine
from engine.samplers import SAMPLERS, make_scheduler

SPEC_SAMPLERS = ["ddim", "euler", "euler a", "heun", "lms", "dpm++ 2m", "dpm++ 2s", "dpm++ sde", "dpm2", "dpm2 a"]
KARRAS_SAMPLERS = [name for name in SAMPLERS if name.endswith(" karras")]


def generate(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_get_samplers_lists_every_accepted_name_and_the_default(client):
    answer = client.get("/samplers").get_json()
    assert answer["default"] == "dpm++ 2m"
    assert set(SPEC_SAMPLERS + ["dpm++ 2m sde", "dpm++ 2m karras", "euler karras", "dpm2 karras"]) <= set(
        answer["samplers"]
    )
    assert answer["samplers"] == list(SAMPLERS)


def test_every_spec_sampler_that_diffusers_can_run_on_karras_sigmas_has_a_karras_variant():
    without = {"ddim", "euler a"}  # DDIMScheduler and EulerAncestralDiscreteScheduler have no Karras option
    expected = {f"{name} karras" for name in SPEC_SAMPLERS + ["dpm++ 2m sde"] if name not in without}
    assert set(KARRAS_SAMPLERS) == expected


@pytest.mark.parametrize("sampler", KARRAS_SAMPLERS)
def test_a_karras_sampler_runs_its_schedulers_karras_sigmas_and_the_plain_one_does_not(client, engine, sampler):
    plain = sampler.removesuffix(" karras")
    karras_picture = pixels(generate(client, sampler=sampler)["img"])
    scheduler = engine.models.get("demo").txt2img.scheduler
    assert type(scheduler) is SAMPLERS[plain][0]
    assert scheduler.config.use_karras_sigmas is True
    plain_picture = pixels(generate(client, sampler=plain)["img"])
    assert engine.models.get("demo").txt2img.scheduler.config.use_karras_sigmas is False
    assert not np.array_equal(karras_picture, plain_picture)


def test_a_plain_sampler_name_means_plain_sigmas_even_if_the_models_scheduler_config_asks_for_karras():
    model_config = {**imagine.DPMSolverMultistepScheduler().config, "use_karras_sigmas": True}
    assert make_scheduler("dpm++ 2m", model_config, seed=1).config.use_karras_sigmas is False
    assert make_scheduler("dpm++ 2m karras", model_config, seed=1).config.use_karras_sigmas is True


def test_dpm_2m_sde_is_the_sde_variant_of_dpm_solver_and_repeats_for_the_same_seed(client, engine):
    first = pixels(generate(client, sampler="DPM++ 2M SDE", seed=5)["img"])
    scheduler = engine.models.get("demo").txt2img.scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"
    assert np.array_equal(first, pixels(generate(client, sampler="dpm++ 2m sde", seed=5)["img"]))
    assert not np.array_equal(first, pixels(generate(client, sampler="dpm++ 2m sde", seed=6)["img"]))
    assert not np.array_equal(first, pixels(generate(client, sampler="dpm++ 2m", seed=5)["img"]))


def test_an_unknown_sampler_is_refused_listing_the_karras_names_too(client):
    response = client.post("/generate", json={"prompt": "x", "sampler": "euler a karras"})
    assert response.status_code == 400
    assert "sampler 'euler a karras' is unknown" in response.get_json()["error"]
    assert "dpm++ 2m karras" in response.get_json()["error"]
