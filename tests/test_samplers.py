"""Samplers and schedule types on /generate and GET /samplers, and what a picture records of them."""

import itertools

import numpy as np
import pytest
from conftest import FAST, decode_png, pixels

from api.a1111 import a1111_sampler
from engine.ksampling import KDiffusionScheduler
from engine.samplers import SAMPLER_NAMES
from engine.schedules import LABELS, SCHEDULE_NAMES


def generate(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def refusal(client, **fields) -> str:
    response = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    assert response.status_code == 400, response.get_json()
    return response.get_json()["error"]


def parameters(answer) -> str:
    return decode_png(answer["img"]).info["parameters"]


def test_get_samplers_lists_the_samplers_the_schedules_and_which_sampler_takes_which(client):
    answer = client.get("/samplers").get_json()
    assert answer["default"] == "dpm++ 2m"
    assert answer["samplers"] == list(SAMPLER_NAMES)
    assert {"euler", "euler a", "dpm++ 2m", "dpm++ sde", "ddim", "lcm", "dpm++ 2s a"} <= set(answer["samplers"])
    assert [schedule["name"] for schedule in answer["schedules"]] == list(SCHEDULE_NAMES)
    assert {"name": "sgm_uniform", "label": "SGM Uniform"} in answer["schedules"]
    assert answer["schedules_by_sampler"]["ddim"] == ["automatic"]
    assert answer["schedules_by_sampler"]["euler a"] == list(SCHEDULE_NAMES)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm++ 2m", "dpm++ sde", "dpm2", "euler a", "lms"])
def test_a_karras_sampler_name_is_the_sampler_on_the_karras_schedule(client, sampler):
    named = generate(client, sampler=f"{sampler} karras", seed=3)
    fielded = generate(client, sampler=sampler, schedule="karras", seed=3)
    assert np.array_equal(pixels(named["img"]), pixels(fielded["img"]))
    assert "Schedule type: Karras" in parameters(named)


def test_karras_with_euler_a_draws_karras_as_asked_not_the_plain_schedule(client):
    karras = generate(client, sampler="euler a", schedule="Karras", seed=4)
    plain = generate(client, sampler="euler a", seed=4)
    assert not np.array_equal(pixels(karras["img"]), pixels(plain["img"]))
    assert "Sampler: Euler a, Schedule type: Karras" in parameters(karras)
    assert "Sampler: Euler a, Schedule type: Automatic" in parameters(plain)


def test_automatic_is_the_samplers_own_schedule_as_in_a1111(client):
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in parameters(generate(client, sampler="dpm++ 2m"))
    assert "Sampler: DPM++ 2M SDE, Schedule type: Exponential" in parameters(generate(client, sampler="dpm++ 2m sde"))
    automatic, karras = (
        generate(client, sampler="dpm++ 2m", seed=2),
        generate(client, sampler="dpm++ 2m karras", seed=2),
    )
    assert np.array_equal(pixels(automatic["img"]), pixels(karras["img"]))


# Schedules that step through the same sigmas with Euler: its own ("automatic") is the model's timesteps, uniform,
# as "normal" is for a discrete model; polyexponential is exponential at its default rho of 1.
SAME_SIGMAS = ({"automatic", "uniform", "normal"}, {"exponential", "polyexponential"})


def test_every_schedule_draws_its_own_picture_with_a_k_diffusion_sampler_and_the_picture_says_which(client):
    drawn = {schedule: generate(client, sampler="euler", schedule=schedule, seed=8) for schedule in SCHEDULE_NAMES}
    for schedule, answer in drawn.items():
        assert f"Sampler: Euler, Schedule type: {LABELS[schedule]}," in parameters(answer)
    for one, other in itertools.combinations(SCHEDULE_NAMES, 2):
        if not any({one, other} <= same for same in SAME_SIGMAS):
            assert not np.array_equal(pixels(drawn[one]["img"]), pixels(drawn[other]["img"])), (one, other)


def test_an_unknown_schedule_is_refused_listing_the_valid_ones(client):
    error = refusal(client, schedule="quantum")
    assert "schedule 'quantum' is unknown" in error and "karras" in error and "sgm_uniform" in error


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])
def test_a_schedule_the_sampler_cannot_use_is_refused_saying_which_it_takes(client, sampler):
    assert "must be 'automatic', not 'karras'" in refusal(client, sampler=sampler, schedule="karras")
    assert "must be 'automatic'" in refusal(client, sampler=f"{sampler} karras")


def test_a_sampler_name_naming_one_schedule_and_a_schedule_field_naming_another_are_refused(client):
    assert "names schedule 'karras', but schedule is 'exponential'" in refusal(
        client, sampler="dpm++ 2m karras", schedule="exponential"
    )


def test_an_unknown_sampler_is_refused_listing_the_names(client):
    error = refusal(client, sampler="euler b")
    assert "sampler 'euler b' is unknown" in error and "dpm++ 2m" in error


def test_the_old_name_dpm_2s_is_a1111s_dpm_2s_a(client):
    assert "Sampler: DPM++ 2S a" in parameters(generate(client, sampler="dpm++ 2s"))


def test_each_generation_gets_a_fresh_a1111_scheduler_with_the_sampler_and_schedule_asked(client, engine):
    generate(client, sampler="DPM++ SDE", schedule="exponential")
    scheduler = engine.models.get("demo").txt2img.scheduler
    assert isinstance(scheduler, KDiffusionScheduler)
    assert (scheduler.config.sampler, scheduler.config.schedule) == ("dpm++ sde", "exponential")


def test_dpm_2m_sde_repeats_for_the_same_seed_and_differs_for_another(client):
    first = pixels(generate(client, sampler="DPM++ 2M SDE", seed=5)["img"])
    assert np.array_equal(first, pixels(generate(client, sampler="dpm++ 2m sde", seed=5)["img"]))
    assert not np.array_equal(first, pixels(generate(client, sampler="dpm++ 2m sde", seed=6)["img"]))


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, ("euler a", "karras", "Euler a", [])),
        ({"sampler_name": "DPM++ 2M Karras"}, ("dpm++ 2m", "karras", "DPM++ 2M", [])),
        ({"sampler_name": "DPM++ 2M", "scheduler": "sgm_uniform"}, ("dpm++ 2m", "sgm_uniform", "DPM++ 2M", [])),
        ({"sampler_name": "DDIM", "scheduler": "karras"}, ("ddim", "automatic", "DDIM", ["scheduler"])),
        ({"sampler_name": "Euler", "scheduler": "Turbo"}, ("euler", "automatic", "Euler", ["scheduler"])),
        ({"sampler_name": "UniPC"}, ("euler", "automatic", "Euler", ["sampler_name"])),
        ({"sampler_index": "k_dpm_2_a"}, ("euler", "automatic", "Euler", ["sampler_name"])),
    ],
)
def test_a1111_sampler_and_scheduler_are_drawn_as_asked_or_fall_back_saying_so(body, expected):
    assert a1111_sampler(body) == expected
