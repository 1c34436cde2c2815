"""Schedule types: the sigmas AUTOMATIC1111 steps through, checked against k-diffusion and diffusers."""

import kdiffusion_reference
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from engine.schedules import (
    AYS_SD15,
    SCHEDULE_NAMES,
    SCHEDULES,
    DiscreteSchedule,
    alphas_cumprod_from_config,
    sampling_sigmas,
    schedule_name,
)

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
MODEL = DiscreteSchedule.from_config(SD_CONFIG)
STEPS = [1, 4, 7, 20, 25]


@pytest.fixture(scope="module")
def k_diffusion():
    return kdiffusion_reference.load()


@pytest.fixture(scope="module")
def k_model(k_diffusion):
    """k-diffusion's discrete eps denoiser on the same cumulative alphas (it holds the sigma table)."""
    return k_diffusion[1].DiscreteEpsDDPMDenoiser(None, MODEL.alphas_cumprod, quantize=False)


@pytest.mark.parametrize("steps", STEPS)
def test_uniform_is_k_diffusions_get_sigmas(k_model, steps):
    assert torch.equal(sampling_sigmas("uniform", steps, MODEL), k_model.get_sigmas(steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["karras", "exponential", "polyexponential"])
def test_karras_exponential_and_polyexponential_are_k_diffusions_on_the_models_sigma_range(k_diffusion, name, steps):
    reference = getattr(k_diffusion[0], f"get_sigmas_{name}")
    expected = reference(steps, k_model_range()[0], k_model_range()[1])
    assert torch.equal(sampling_sigmas(name, steps, MODEL), expected)


def k_model_range():
    return MODEL.sigmas[0].item(), MODEL.sigmas[-1].item()


def test_sigma_to_t_and_back_are_k_diffusions(k_model):
    sigmas = torch.exp(torch.linspace(-3.6, 2.7, 301))
    assert torch.equal(MODEL.sigma_to_t(sigmas), k_model.sigma_to_t(sigmas))
    t = torch.linspace(0, 999, 777)
    assert torch.equal(MODEL.t_to_sigma(t), k_model.t_to_sigma(t))


def test_four_uniform_steps_start_at_the_top_timestep_as_a1111s_do():
    sigmas = sampling_sigmas("uniform", 4, MODEL)
    assert sigmas[0].item() == pytest.approx(14.6146, abs=1e-4)
    assert MODEL.sigma_to_t(sigmas[:-1]).tolist() == pytest.approx([999, 666, 333, 0], abs=1e-3)
    assert sigmas[-1].item() == 0


def test_the_cumulative_alphas_are_diffusers_computed_in_double_precision():
    diffusers_alphas = EulerDiscreteScheduler(**SD_CONFIG).alphas_cumprod
    assert torch.allclose(alphas_cumprod_from_config(SD_CONFIG), diffusers_alphas, rtol=1e-5)
    linear = {**SD_CONFIG, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    assert torch.allclose(
        alphas_cumprod_from_config(linear), EulerDiscreteScheduler(**linear).alphas_cumprod, rtol=1e-5
    )


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_simple_is_every_nth_training_sigma_as_diffusers_trailing_spacing_picks_them(steps):
    scheduler = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert torch.allclose(sampling_sigmas("simple", steps, MODEL), scheduler.sigmas, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_the_ddim_schedule_is_ddims_own_timesteps(steps):
    scheduler = DDIMScheduler(**SD_CONFIG, timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(steps)
    assert torch.equal(sampling_sigmas("ddim", steps, MODEL)[:-1], MODEL.sigmas[scheduler.timesteps])


def test_the_ddim_schedule_takes_more_steps_where_the_count_does_not_divide_the_timesteps():
    assert len(sampling_sigmas("ddim", 7, MODEL)) == 9  # 1, 143, ..., 995: eight steps and the final 0


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_sgm_uniform_spaces_n_plus_one_timesteps_and_drops_the_last(steps):
    t = MODEL.sigma_to_t(sampling_sigmas("sgm_uniform", steps, MODEL)[:-1])
    assert t.tolist() == pytest.approx(torch.linspace(999, 0, steps + 1)[:-1].tolist(), abs=1e-3)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_every_schedule_starts_near_the_top_and_falls(name, steps):
    sigmas = sampling_sigmas(name, steps, MODEL)
    if name == "align_your_steps" and steps == 1:
        return  # interpolating NVIDIA's table to one point lands on its smallest sigma, in A1111 too
    if name != "ddim":
        assert sigmas[0].item() == pytest.approx(14.6146, abs=2e-3)
        assert len(sigmas) == steps + 1
    assert (sigmas[1:] <= sigmas[:-1]).all()


def test_kl_optimal_ends_at_the_smallest_sigma_not_at_zero():
    assert sampling_sigmas("kl_optimal", 4, MODEL)[-1].item() == pytest.approx(MODEL.sigma_min, rel=1e-5)


def test_align_your_steps_takes_nvidias_eleven_sigmas_as_eleven_steps_and_interpolates_other_counts():
    # A1111 reads NVIDIA's 10-step table (11 sigmas, ending at 0.029) as 11 steps and then appends 0.
    assert sampling_sigmas("align_your_steps", 11, MODEL).tolist() == pytest.approx([*AYS_SD15, 0.0])
    ten = sampling_sigmas("align_your_steps", 10, MODEL)
    assert len(ten) == 11 and ten[0].item() == pytest.approx(14.615) and ten[-2].item() == pytest.approx(0.029)


@pytest.mark.parametrize("steps", [4, 20])
def test_discarding_the_penultimate_sigma_asks_for_one_step_more_and_drops_the_next_to_last(steps):
    longer = sampling_sigmas("karras", steps + 1, MODEL)
    sigmas = sampling_sigmas("karras", steps, MODEL, discard_penultimate=True)
    assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))


@pytest.mark.parametrize(
    "text, name",
    [
        ("Karras", "karras"),
        ("sgm uniform", "sgm_uniform"),
        ("SGMUniform", "sgm_uniform"),
        ("Align Your Steps", "align_your_steps"),
        ("Automatic", "automatic"),
        ("KL Optimal", "kl_optimal"),
        ("quantum", None),
    ],
)
def test_a_schedule_is_found_by_its_a1111_name_label_or_alias(text, name):
    assert schedule_name(text) == name


def test_the_schedule_names_are_a1111s_with_automatic_first():
    assert SCHEDULE_NAMES[0] == "automatic"
    assert set(SCHEDULE_NAMES) == {
        "automatic",
        "uniform",
        "karras",
        "exponential",
        "polyexponential",
        "sgm_uniform",
        "kl_optimal",
        "align_your_steps",
        "simple",
        "normal",
        "ddim",
        "beta",
    }
