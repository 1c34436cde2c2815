"""Imagine's samplers draw AUTOMATIC1111's picture: the same UNet sampled by k-diffusion's own functions (A1111's
sampling code) with A1111's noise and sigmas is the reference, compared in pixels after the VAE."""

import a1111_rng_reference
import kdiffusion_reference
import numpy as np
import pytest
import torch
from conftest import pixels

import imagine
from engine.engine import Engine
from engine.ksampling import KSAMPLERS, KDiffusionScheduler, a1111_ddim_timesteps
from engine.noise import PictureNoise, brownian_noise_as_on_a_gpu
from engine.prompts import prompt_embeddings
from engine.schedules import sampling_sigmas

K_FUNCTIONS = {
    "euler": "sample_euler",
    "euler a": "sample_euler_ancestral",
    "heun": "sample_heun",
    "lms": "sample_lms",
    "dpm2": "sample_dpm_2",
    "dpm2 a": "sample_dpm_2_ancestral",
    "dpm++ 2s a": "sample_dpmpp_2s_ancestral",
    "dpm++ 2m": "sample_dpmpp_2m",
    "dpm++ sde": "sample_dpmpp_sde",
    "dpm++ 2m sde": "sample_dpmpp_2m_sde",
    "dpm++ 2m sde heun": "sample_dpmpp_2m_sde",
    "dpm++ 3m sde": "sample_dpmpp_3m_sde",
}
# The contract's six (A1111 names): Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DPM++ SDE Karras, DDIM.
CONTRACT = [("euler", "automatic"), ("euler a", "automatic"), ("dpm++ 2m", "uniform"), ("dpm++ 2m", "karras"),
            ("dpm++ sde", "karras"), ("ddim", "automatic")]  # fmt: skip
OTHERS = [(name, "automatic") for name in K_FUNCTIONS if name not in ("euler", "euler a")]
OTHERS += [("euler a", "karras"), ("euler", "sgm_uniform"), ("euler", "align_your_steps"), ("dpm++ 2m", "beta")]
SEEDS, SIZE, GUIDANCE = [2**64 - 2, 2**64 - 1], 64, 7.0  # two pictures, the seeds at the very top
# How far Imagine's pictures may be from A1111's, as a mean in levels of 255. The same sampling differs by float
# rounding alone (at most 0.0003 measured, on an AVX-512 CPU); the nearest wrong one, DPM++ 2M on sgm_uniform's sigmas
# where A1111 took Karras', by 0.99 (CONTROLS): a bound of a level would not tell them apart.
BOUND = 0.1
PROMPT, NEG = "a lighthouse at (dawn:1.2)", "blurry"


@pytest.fixture(scope="module")
def engine32(tmp_path_factory):
    """An engine on the demo model in float32, the precision the contract is measured in."""
    engine = Engine(imagine.Settings(model="demo", fp_prec="32", models_dir=tmp_path_factory.mktemp("none")))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def client32(engine32):
    return imagine.create_app(engine32).test_client()


@pytest.fixture(scope="module")
def pipe(engine32, client32):
    client32.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "num_steps": 1})  # loads the model
    return engine32.models.get("demo").txt2img


@pytest.fixture(scope="module")
def k_diffusion():
    return kdiffusion_reference.load()


@pytest.fixture(scope="module")
def conditioning(pipe):
    return encoded_prompts(pipe)


def encoded_prompts(pipe) -> tuple:
    """The prompts as Imagine encodes them (A1111's weights and chunks), for both pictures."""
    with torch.inference_mode():
        encoded = prompt_embeddings(pipe, PROMPT, NEG, 1, {})
    count = len(SEEDS)
    return encoded["prompt_embeds"].repeat(count, 1, 1), encoded["negative_prompt_embeds"].repeat(count, 1, 1)


def imagine_pictures(client, sampler, schedule, steps, rng, size=SIZE) -> np.ndarray:
    """The two pictures as /generate draws them, 0..255."""
    body = {"prompt": PROMPT, "neg": NEG, "width": size, "height": size, "num_steps": steps, "guidance": GUIDANCE,
            "sampler": sampler, "schedule": schedule, "rng": rng, "seed": SEEDS[0], "n": len(SEEDS)}  # fmt: skip
    answer = client.post("/generate", json=body).get_json()
    assert answer["seeds"] == SEEDS, answer
    return np.stack([pixels(image) for image in answer["images"]]).astype(np.float64)


def cfg_denoiser(pipe, external, conditioning):
    """A1111's CFGDenoiser around k-diffusion's CompVisDenoiser: uncond + (cond - uncond) * scale, on denoised."""
    alphas = KDiffusionScheduler.for_model(dict(pipe.scheduler.config), "euler").model.alphas_cumprod
    embeddings = torch.cat([conditioning[0], conditioning[1]])

    def eps(x, t, **_):
        return pipe.unet(x, t, encoder_hidden_states=embeddings).sample

    model = external.DiscreteEpsDDPMDenoiser(types_namespace(eps), alphas, quantize=False)

    def denoise(x, sigma, **_):
        out = model(torch.cat([x, x]), torch.cat([sigma, sigma]))
        cond, uncond = out.chunk(2)
        return uncond + (cond - uncond) * GUIDANCE

    return denoise, model


def types_namespace(function):
    class Inner(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return function(*args, **kwargs)

    return Inner()


def reference_latents(pipe, k_diffusion, conditioning, sampler, schedule, steps, rng, size=SIZE, noise=None):
    sampling, external = k_diffusion
    denoise, model = cfg_denoiser(pipe, external, conditioning)
    noise = noise or PictureNoise(rng, SEEDS, (4, size // 8, size // 8))
    start = noise.next()
    if sampler == "ddim":  # A1111's DDIM (eta 0) is Euler in sigma space on its timesteps' sigmas
        timesteps = a1111_ddim_timesteps(steps)
        sigmas = model.sigmas[timesteps.flip(0)]
        x = sampling.sample_euler(denoise, start * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, disable=True)
        return x / (sigmas[-1] ** 2 + 1) ** 0.5
    options = KSAMPLERS[sampler]
    resolved = options.schedule if schedule == "automatic" else schedule
    sigmas = sampling_sigmas(resolved, steps, _schedule_of(pipe), discard_penultimate=options.discard_penultimate)
    sampling.torch, extra = TorchWithNoise(noise), {}
    if sampler == "dpm++ 2m sde heun":
        extra["solver_type"] = "heun"
    try:
        with brownian_noise_as_on_a_gpu():  # A1111 on an NVIDIA GPU: its Brownian trees draw CUDA's numbers
            if options.brownian:
                low, high = sigmas[sigmas > 0].min(), sigmas.max()
                extra["noise_sampler"] = sampling.BrownianTreeNoiseSampler(start, low, high, seed=SEEDS)
            return getattr(sampling, K_FUNCTIONS[sampler])(denoise, start * sigmas[0], sigmas, disable=True, **extra)
    finally:
        sampling.torch = torch


def _schedule_of(pipe):
    return KDiffusionScheduler.for_model(dict(pipe.scheduler.config), "euler").model


class TorchWithNoise:
    """k-diffusion's `torch`, with randn_like drawing the pictures' next noise, as A1111's TorchHijack does."""

    def __init__(self, noise):
        self.noise = noise

    def __getattr__(self, name):
        return self.randn_like if name == "randn_like" else getattr(torch, name)

    def randn_like(self, x):
        return self.noise.next()


def reference_pictures(
    pipe, k_diffusion, conditioning, sampler, schedule, steps, rng, size=SIZE, noise=None
) -> np.ndarray:
    """The two pictures A1111's sampling draws (from `noise`, its ImageRNG's; None: the seeds' own), decoded and
    rounded to 0..255 as the pipeline rounds them."""
    with torch.inference_mode():
        x = reference_latents(pipe, k_diffusion, conditioning, sampler, schedule, steps, rng, size, noise)
        if sampler == "ddim" and steps == 1:  # A1111's DDIM evaluates the model steps - 1 times: none here
            x = PictureNoise(rng, SEEDS, (4, size // 8, size // 8)).next()
        decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return (pipe.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(np.float64)


def mean_difference(client, pipe, k_diffusion, conditioning, sampler, schedule, steps, rng="cpu", size=SIZE) -> float:
    """The mean absolute difference between Imagine's pictures and A1111's, in levels of 255."""
    ours = imagine_pictures(client, sampler, schedule, steps, rng, size)
    reference = reference_pictures(pipe, k_diffusion, conditioning, sampler, schedule, steps, rng, size)
    difference = float(np.abs(ours - reference).mean())
    print(f"{sampler} / {schedule} / {steps} steps / rng {rng}: {difference:.4f} of 255")
    return difference


# Control cases: (what Imagine draws, what the reference draws), differing in one thing from a passing pair: the
# sampler, the schedule (sgm_uniform's sigmas are the nearest to Karras' at 4 steps) or the noise.
CONTROLS = [
    (("euler", "automatic", "cpu"), ("euler a", "automatic", "cpu")),
    (("heun", "automatic", "cpu"), ("euler", "automatic", "cpu")),
    (("dpm++ 2m", "karras", "cpu"), ("dpm++ 2m", "sgm_uniform", "cpu")),
    (("euler a", "automatic", "cpu"), ("euler a", "automatic", "nv")),
]


@pytest.mark.parametrize("ours, theirs", CONTROLS)
def test_the_comparison_tells_a_wrong_sampler_schedule_or_noise_far_beyond_its_bound(
    client32, pipe, k_diffusion, conditioning, ours, theirs
):
    drawn = imagine_pictures(client32, ours[0], ours[1], 4, ours[2])
    reference = reference_pictures(pipe, k_diffusion, conditioning, theirs[0], theirs[1], 4, theirs[2])
    difference = float(np.abs(drawn - reference).mean())
    print(f"{ours} against {theirs}: {difference:.4f} of 255")
    assert difference > BOUND


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("sampler, schedule", CONTRACT)
def test_the_contract_samplers_draw_a1111s_picture_within_a_tenth_of_a_level_of_255(
    client32, pipe, k_diffusion, conditioning, sampler, schedule, steps
):
    assert mean_difference(client32, pipe, k_diffusion, conditioning, sampler, schedule, steps) < BOUND


@pytest.mark.parametrize("sampler, schedule", OTHERS)
def test_the_other_samplers_and_schedules_draw_a1111s_picture_too(
    client32, pipe, k_diffusion, conditioning, sampler, schedule
):
    assert mean_difference(client32, pipe, k_diffusion, conditioning, sampler, schedule, 3) < BOUND


@pytest.mark.parametrize("sampler", ["euler a", "dpm++ sde"])
def test_nv_noise_draws_a1111s_gpu_picture(client32, pipe, k_diffusion, conditioning, sampler):
    assert mean_difference(client32, pipe, k_diffusion, conditioning, sampler, "automatic", 3, rng="nv") < BOUND


# ---- The hires fix's second pass, as A1111's sample_hr_pass runs it: the first pass's latents upscaled by "Latent"
# (bilinear), noised by a noise drawn afresh from the seeds at the new size, then sampled with hr_second_pass_steps
# steps of a schedule of int(steps / strength) steps (A1111's setup_img2img_steps), from where they are left.
HIRES_STEPS, HIRES_STRENGTH = 3, 0.5


def imagine_hires_pictures(client, sampler, schedule, steps) -> np.ndarray:
    body = {"hires_scale": 2, "hires_steps": HIRES_STEPS, "hires_strength": HIRES_STRENGTH, "hires_upscaler": "Latent"}
    answer = client.post("/generate", json={**hires_body(sampler, schedule, steps), **body}).get_json()
    assert answer["seeds"] == SEEDS, answer
    return np.stack([pixels(image) for image in answer["images"]]).astype(np.float64)


def hires_body(sampler, schedule, steps) -> dict:
    return {"prompt": PROMPT, "neg": NEG, "width": SIZE, "height": SIZE, "num_steps": steps, "guidance": GUIDANCE,
            "sampler": sampler, "schedule": schedule, "rng": "cpu", "seed": SEEDS[0], "n": len(SEEDS)}  # fmt: skip


def second_pass_sigmas(pipe, sampler, schedule, a1111_fix_steps=True) -> torch.Tensor:
    """The sigmas A1111's second pass samples on; without its fixed steps, those its img2img tab would take."""
    options = KSAMPLERS[sampler]
    resolved = options.schedule if schedule == "automatic" else schedule
    steps = int(HIRES_STEPS / HIRES_STRENGTH) if a1111_fix_steps else HIRES_STEPS
    sigmas = sampling_sigmas(resolved, steps, _schedule_of(pipe), discard_penultimate=options.discard_penultimate)
    return sigmas[steps - HIRES_STEPS :] if a1111_fix_steps else sigmas[steps - int(HIRES_STRENGTH * steps) - 1 :]


def reference_hires_pictures(pipe, k_diffusion, conditioning, sampler, schedule, steps, sigmas) -> np.ndarray:
    sampling, external = k_diffusion
    denoise, _ = cfg_denoiser(pipe, external, conditioning)
    with torch.inference_mode():
        first = reference_latents(pipe, k_diffusion, conditioning, sampler, schedule, steps, "cpu")
        size = (SIZE * 2 // 8, SIZE * 2 // 8)
        latents = torch.nn.functional.interpolate(first, size=size, mode="bilinear", antialias=False)
        noise = PictureNoise("cpu", SEEDS, (4, *size))  # A1111's new ImageRNG for the second pass's shape
        start = latents + noise.next() * sigmas[0]
        sampling.torch = TorchWithNoise(noise)
        try:
            x = getattr(sampling, K_FUNCTIONS[sampler])(denoise, start, sigmas, disable=True)
        finally:
            sampling.torch = torch
        decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return (pipe.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(np.float64)


@pytest.mark.parametrize("sampler, schedule", [("euler a", "automatic"), ("dpm++ 2m", "karras"), ("heun", "automatic")])
def test_the_hires_fixs_second_pass_draws_a1111s_picture(client32, pipe, k_diffusion, conditioning, sampler, schedule):
    ours = imagine_hires_pictures(client32, sampler, schedule, 4)
    sigmas = second_pass_sigmas(pipe, sampler, schedule)
    reference = reference_hires_pictures(pipe, k_diffusion, conditioning, sampler, schedule, 4, sigmas)
    difference = float(np.abs(ours - reference).mean())
    print(f"hires {sampler} / {schedule}: {difference:.4f} of 255")
    assert difference < BOUND


def test_the_hires_comparison_tells_the_img2img_tabs_steps_from_the_second_passs(
    client32, pipe, k_diffusion, conditioning
):
    ours = imagine_hires_pictures(client32, "euler a", "automatic", 4)
    sigmas = second_pass_sigmas(pipe, "euler a", "automatic", a1111_fix_steps=False)
    reference = reference_hires_pictures(pipe, k_diffusion, conditioning, "euler a", "automatic", 4, sigmas)
    assert float(np.abs(ours - reference).mean()) > BOUND


class A1111VariationNoise(PictureNoise):
    """The seeds' noise with A1111's variation starting noise (tests/a1111_rng_reference.py) in place of theirs: the
    step noise goes on from each seed's generator, as in A1111 (test_noise.py checks that it does here too)."""

    def __init__(self, rng, seeds, subseeds, strength, resize_from):
        super().__init__(rng, seeds, (4, SIZE // 8, SIZE // 8))
        first = a1111_rng_reference.first_noise(rng, self.shape, seeds, subseeds, strength, resize_from)
        self.first = torch.from_numpy(first).float()

    def next(self):
        started, noise = self.started, super().next()
        return noise if started else self.first


@pytest.mark.parametrize("sampler, rng", [("euler a", "cpu"), ("dpm++ 2m", "nv")])
def test_variation_seeds_draw_a1111s_pictures(client32, pipe, k_diffusion, conditioning, sampler, rng):
    variation = {"variation_seed": 2**64 - 2, "variation_strength": 0.4}
    resize = {"seed_resize_from_width": 48, "seed_resize_from_height": 80}
    body = {"prompt": PROMPT, "neg": NEG, "width": SIZE, "height": SIZE, "num_steps": 3, "guidance": GUIDANCE,
            "sampler": sampler, "rng": rng, "seed": 7, "n": 2, **variation, **resize}  # fmt: skip
    answer = client32.post("/generate", json=body).get_json()
    assert answer["seeds"] == [7, 7]  # as A1111's all_seeds: the batch varies by its variation seeds
    ours = np.stack([pixels(image) for image in answer["images"]]).astype(np.float64)
    noise = A1111VariationNoise(rng, [7, 7], SEEDS, 0.4, (48, 80))
    reference = reference_pictures(pipe, k_diffusion, conditioning, sampler, "automatic", 3, rng, noise=noise)
    assert float(np.abs(ours - reference).mean()) < BOUND
    without = reference_pictures(pipe, k_diffusion, conditioning, sampler, "automatic", 3, rng)
    assert float(np.abs(ours - without).mean()) > BOUND  # the variation changed the pictures
