"""Z-Image, FLUX.2 klein and FLUX.1 drawing: tiny random models of their real architectures in a ComfyUI folder
(flow_models), drawn with the network blocked through every mode (seeds, batches, img2img, inpainting, previews),
their samplers and generation data, every dialect (native, A1111 and Forge, OpenAI), a cancel, the CLI and the web
page. Loading and recognising the files is test_flow_families'."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    decode_png,
    element,
    fill_form,
    finished,
    module_at,
    open_page,
    pixels,
    png_data,
    serving,
    wait_until,
)
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from flow_models import SMALL, SPLIT_MODELS, generate
from PIL import Image
from selenium.webdriver.support.ui import Select

import imagine
from engine.errors import ImagineError
from engine.files.families import FAMILIES
from engine.flow import FlowDPMSolver2M
from engine.job import Failed
from engine.request import parse_request

# Every test here but those over loopback runs with the network blocked (conftest's offline).
pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def over_loopback(flow_engine):
    """The flow engine served by waitress on a loopback port, for the CLI and the web page: the tests here that open
    sockets."""
    with serving(flow_engine) as url:
        yield url


def test_the_same_seed_draws_the_same_picture_and_another_seed_another(flow_client):
    first = generate(flow_client, model="flux-2-klein-4b")["img"]
    again = generate(flow_client, model="flux-2-klein-4b")["img"]
    other = generate(flow_client, model="flux-2-klein-4b", seed=8)["img"]
    assert first == again
    assert first != other


def test_picture_k_of_a_batch_is_the_picture_its_seed_draws_alone(flow_client):
    batch = generate(flow_client, model="z_image_turbo_bf16", n=2)
    alone = generate(flow_client, model="z_image_turbo_bf16", seed=8)
    assert batch["seeds"] == [7, 8]
    difference = np.abs(np.asarray(decode_png(batch["images"][1]), int) - np.asarray(decode_png(alone["img"]), int))
    assert difference.max() <= 2  # a batch runs its matrix products in other shapes: float rounding, not a new picture


@pytest.mark.parametrize("name", ["z_image_turbo_bf16", "flux-2-klein-4b", "flux1-schnell"])
def test_img2img_and_inpainting_keep_what_the_mask_keeps(flow_client, name):
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    img2img = generate(flow_client, model=name, img=png_data(start), strength=0.5)
    assert decode_png(img2img["img"]).size == (64, 64)
    painted = generate(flow_client, model=name, img=png_data(start), mask=png_data(mask), mask_blur=0)
    pixels = np.asarray(decode_png(painted["img"]).convert("RGB"), int)
    assert np.abs(pixels[:8, :8] - (200, 30, 30)).max() <= 2  # outside the mask: the input's pixels


def test_previews_stream_from_the_packed_latents_of_each_family(flow_client):
    for name in ("flux1-schnell", "flux-2-klein-4b", "z_image_turbo_bf16"):
        body = {"prompt": "a fox", "model": name, **SMALL, "num_steps": 3, "stream": 1}
        previews = [line for line in streamed(flow_client, body) if not line["done"]]
        assert [line["step"] for line in previews] == [1, 2]
        assert decode_png(previews[0]["img"]).size == (64, 64)
        decoded = streamed(flow_client, {**body, "preview": "full"})[0]
        assert decode_png(decoded["img"]).size == (64, 64)


def streamed(client, body: dict) -> list:
    text = client.post("/generate", json=body).get_data(as_text=True)
    return [json.loads(line) for line in text.splitlines() if line]


def test_a_negative_prompt_guidance_and_emphasis_the_family_does_without_are_noticed_not_errors(flow_client):
    answer = generate(flow_client, model="flux1-schnell", neg="blurry", guidance=5, prompt="a (red:1.3) fox")
    notices = " ".join(answer["notices"])
    assert "neg is ignored" in notices and "guidance is ignored" in notices and "(word:weight)" in notices
    assert "notices" not in generate(flow_client, model="z_image_turbo_bf16", neg="blurry", guidance=2)
    assert "notices" not in generate(flow_client, model="flux-2-klein-4b")  # its own guidance is no request for more
    turbo = generate(flow_client, model="z_image_turbo_bf16", neg="blurry")  # Turbo's own guidance, 0: no CFG pass
    assert turbo["notices"] == [
        "neg is ignored at guidance 0: Z-Image reads a negative prompt only with guidance above 0"
    ]


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"width": 72}, "width", "multiple of 16"),
        ({"sampler": "heun"}, "sampler", "euler, euler a, dpm++ 2m"),
        ({"guidance": 12}, "guidance", "between 0 and 10.0"),
    ],
)
def test_what_a_flow_family_cannot_draw_is_refused_before_any_work(flow_client, body, field, words):
    response = flow_client.post("/generate", json={"prompt": "p", "model": "z_image_turbo_bf16", **SMALL, **body})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error.startswith(field) and words in error, error


def test_a_distilled_guidance_beyond_flux1_devs_range_is_refused_naming_the_field_it_came_in(flow_client):
    body = {"prompt": "p", "model": "flux1-dev", **SMALL, "distilled_guidance": 12}
    native = flow_client.post("/generate", json=body)
    assert native.status_code == 400
    assert native.get_json()["error"].startswith("distilled_guidance must be between 0 and 10.0"), native.get_json()
    forge = {"prompt": "p", "steps": 1, "width": 64, "height": 64, "cfg_scale": 1, "distilled_cfg_scale": 12}
    forge["override_settings"] = {"sd_model_checkpoint": "flux1-dev"}
    answer = flow_client.post("/sdapi/v1/txt2img", json=forge)
    assert answer.status_code == 422  # A1111's status for a bad value
    assert answer.get_json()["detail"].startswith("distilled_cfg_scale must be between 0 and 10.0"), answer.get_json()


def test_flux1_devs_distilled_guidance_is_written_as_forge_writes_it_and_pasted_back_redraws_the_picture(
    flow_client,
):
    first = generate(flow_client, model="flux1-dev", guidance=4.5, num_steps=3)
    text = decode_png(first["img"]).info["parameters"]
    assert "CFG scale: 1.0, Distilled CFG Scale: 4.5," in text
    again = flow_client.post("/generate", json={"parameters": text}).get_json()
    assert np.array_equal(np.asarray(decode_png(again["img"])), np.asarray(decode_png(first["img"])))
    assert again["parameters_ignored"] == []


def test_samplers_for_a_model_are_the_flow_samplers(flow_client):
    answer = flow_client.get("/samplers?model=flux1-dev").get_json()
    assert answer["samplers"] == ["euler", "euler a", "dpm++ 2m"] and answer["default"] == "euler"
    assert answer["defaults"] == {"num_steps": 28, "guidance": 3.5, "size": 1024}
    assert "heun" in flow_client.get("/samplers").get_json()["samplers"]


def test_euler_a_draws_the_same_picture_for_the_same_seed(flow_client):
    first = generate(flow_client, model="z_image_turbo_bf16", sampler="euler a")["img"]
    assert first == generate(flow_client, model="z_image_turbo_bf16", sampler="euler a")["img"]
    assert first != generate(flow_client, model="z_image_turbo_bf16")["img"]


@pytest.mark.parametrize("name", ["z_image_turbo_bf16", "flux-2-klein-4b", "flux1-dev"])
def test_dpm_2m_draws_each_family_the_same_for_the_same_seed_and_img2img_too(flow_client, name):
    first = generate(flow_client, model=name, sampler="dpm++ 2m")
    assert "Sampler: DPM++ 2M," in decode_png(first["img"]).info["parameters"]
    assert first["img"] == generate(flow_client, model=name, sampler="dpm++ 2m")["img"]
    assert first["img"] != generate(flow_client, model=name)["img"]
    start = png_data(Image.new("RGB", (64, 64), (200, 30, 30)))
    redrawn = generate(flow_client, model=name, sampler="dpm++ 2m", img=start, strength=0.5, num_steps=4)["img"]
    assert redrawn != generate(flow_client, model=name, img=start, strength=0.5, num_steps=4)["img"]


@pytest.mark.parametrize("sampler", ["euler", "dpm++ 2m"])
def test_a_flow_models_picture_pasted_back_redraws_itself_with_each_sampler(flow_client, sampler):
    first = generate(flow_client, model="flux-2-klein-4b", sampler=sampler, num_steps=3)
    text = decode_png(first["img"]).info["parameters"]
    assert "Schedule type: Automatic," in text  # the model's own shifted schedule, not an SD sampler's default
    again = flow_client.post("/generate", json={"parameters": text}).get_json()
    assert again["img"] == first["img"] and again["parameters_ignored"] == [] and "notices" not in again


FORGE_FLUX_INFOTEXT = """a fox in the snow
Steps: 3, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 7, Size: 64x64, \
Model: flux1-dev"""


def test_forges_flux_generation_data_draws_with_its_distilled_guidance_and_says_the_schedule_is_ignored(flow_client):
    pasted = flow_client.post("/generate", json={"parameters": FORGE_FLUX_INFOTEXT})
    assert pasted.status_code == 200, pasted.get_json()
    answer = pasted.get_json()
    assert answer["notices"] == ["schedule 'simple' is ignored: FLUX.1-dev keeps its own shifted schedule"]
    asked = dict(prompt="a fox in the snow", model="flux1-dev", num_steps=3, rng="gpu")  # A1111's default noise
    assert np.array_equal(pixels(answer["img"]), pixels(generate(flow_client, **asked, guidance=2.5)["img"]))
    assert not np.array_equal(pixels(answer["img"]), pixels(generate(flow_client, **asked)["img"]))


def test_generation_data_naming_no_schedule_draws_a_flow_model_with_no_schedule_notice(flow_client):
    pasted = flow_client.post(
        "/generate", json={"parameters": FORGE_FLUX_INFOTEXT.replace("Schedule type: Simple, ", "")}
    )
    assert pasted.status_code == 200 and "notices" not in pasted.get_json(), pasted.get_json()


def test_a_guidance_given_beside_forges_flux_generation_data_is_the_one_drawn_with(flow_client):
    pasted = flow_client.post("/generate", json={"parameters": FORGE_FLUX_INFOTEXT, "guidance": 5}).get_json()
    asked = dict(prompt="a fox in the snow", model="flux1-dev", num_steps=3, rng="gpu")
    assert np.array_equal(pixels(pasted["img"]), pixels(generate(flow_client, **asked, guidance=5)["img"]))


def test_a_schedule_asked_of_a_flow_model_is_ignored_with_a_notice(flow_client):
    answer = generate(flow_client, model="z_image_turbo_bf16", schedule="karras", num_steps=2)
    assert answer["notices"] == ["schedule 'karras' is ignored: Z-Image keeps its own shifted schedule"]
    assert answer["img"] == generate(flow_client, model="z_image_turbo_bf16", num_steps=2)["img"]


def test_clip_skip_asked_of_a_flow_model_is_ignored_with_a_notice(flow_client):
    answer = generate(flow_client, model="z_image_turbo_bf16", clip_skip=2, num_steps=2)
    notice = "clip_skip is ignored: it picks a CLIP layer of SD models; Z-Image reads its encoder's own"
    assert answer["notices"] == [notice]


def test_a_prompt_of_more_breaks_than_clip_has_chunks_is_refused_for_sd_only(flow_client):
    prompt = " BREAK ".join(["a lighthouse"] * 70)
    assert generate(flow_client, model="z_image_turbo_bf16", prompt=prompt, num_steps=1)["img"]
    refused = flow_client.post("/generate", json={"prompt": prompt, **SMALL})  # the demo model: SD 1.5's CLIP
    assert refused.status_code == 400 and "chunks of 75 tokens (each BREAK starts one)" in refused.get_json()["error"]


def test_forge_clients_draw_flux1_dev_with_their_distilled_cfg_scale_and_read_it_back_as_forge_reports_it(
    flow_client,
):
    body = {"prompt": "a fox", "width": 64, "height": 64, "seed": 3, "steps": 3, "sampler_name": "Euler",
            "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 2.5,
            "override_settings": {"sd_model_checkpoint": "flux1-dev"}}  # fmt: skip
    answer = flow_client.post("/sdapi/v1/txt2img", json=body).get_json()
    info = json.loads(answer["info"])
    assert (info["cfg_scale"], info["distilled_cfg_scale"], info["scheduler"]) == (1.0, 2.5, "Automatic")
    asked = generate(flow_client, prompt="a fox", model="flux1-dev", seed=3, num_steps=3, guidance=2.5)
    assert np.array_equal(pixels(answer["images"][0]), pixels(asked["img"]))


def test_flow_dpm_2m_steps_as_diffusers_flow_form_of_dpm_solver_does_on_the_same_sigmas():
    # diffusers' DPMSolverMultistepScheduler in its flow form, on its own sigmas (the pipelines cannot drive it)
    reference = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        solver_order=2,
        final_sigmas_type="zero",
    )
    reference.set_timesteps(12)
    ours = FlowDPMSolver2M(shift=1.0)  # those sigmas, unshifted again
    ours.set_timesteps(sigmas=reference.sigmas[:-1].numpy())
    assert torch.allclose(ours.sigmas, reference.sigmas.float())
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def velocity(latents, sigma):  # a model whose x0 prediction moves with the latents: the second order matters
        x0 = torch.tanh(target + latents)
        return (latents - x0) / sigma

    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs = mine = start
    for index, (their_t, our_t) in enumerate(zip(reference.timesteps, ours.timesteps, strict=True)):
        theirs = reference.step(velocity(theirs, float(reference.sigmas[index])), their_t, theirs).prev_sample
        mine = ours.step(velocity(mine, float(ours.sigmas[index])), our_t, mine).prev_sample
    assert (mine - theirs).abs().max() < 1e-5  # a first-order solver ends 0.1 away
    assert (mine - start).abs().max() > 1  # it moved: the two agree on a trajectory, not on standing still


def test_flow_dpm_2m_takes_an_euler_step_from_pure_noise():
    # the pipelines' schedules start at sigma 1, where lambda is minus infinity: the first step is first order
    euler, ours = FlowMatchEulerDiscreteScheduler(shift=3.0), FlowDPMSolver2M(shift=3.0)
    for scheduler in (euler, ours):
        scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    latents, velocity = torch.randn(2, 16), torch.randn(2, 16)
    assert torch.allclose(ours.step(velocity, ours.timesteps[0], latents).prev_sample,
                          euler.step(velocity, euler.timesteps[0], latents).prev_sample, atol=1e-6)  # fmt: skip
    second = ours.step(velocity, ours.timesteps[1], latents).prev_sample
    assert torch.isfinite(second).all()


@pytest.mark.parametrize("name", ["z_image_turbo_bf16", "flux-2-klein-4b", "flux1-schnell", "flux1-dev"])
def test_a1111_clients_list_each_family_and_draw_txt2img_and_img2img_with_its_steps(flow_client, name):
    titles = [entry["model_name"] for entry in flow_client.get("/sdapi/v1/sd-models").get_json()]
    assert name in titles
    body = {"prompt": "a fox", "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": name}}  # fmt: skip
    answer = flow_client.post("/sdapi/v1/txt2img", json=body).get_json()
    assert json.loads(answer["info"])["steps"] == FAMILIES[SPLIT_MODELS[name]].default_steps
    again = {**body, "init_images": [answer["images"][0]], "denoising_strength": 0.5}
    redrawn = flow_client.post("/sdapi/v1/img2img", json=again).get_json()
    assert decode_png(redrawn["images"][0]).size == (64, 64) and redrawn["images"][0] != answer["images"][0]


@pytest.mark.parametrize("name", ["z_image_turbo_bf16", "flux-2-klein-4b", "flux1-schnell", "flux1-dev"])
def test_openai_clients_draw_and_edit_with_each_family(flow_client, name):
    body = {"prompt": "a fox", "model": name, "size": "256x256"}
    answer = flow_client.post("/v1/images/generations", json=body).get_json()
    drawn = base64.b64decode(answer["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(drawn)).size == (256, 256)
    form = {**body, "image": (io.BytesIO(drawn), "fox.png")}
    edited = flow_client.post("/v1/images/edits", data=form, content_type="multipart/form-data").get_json()
    assert Image.open(io.BytesIO(base64.b64decode(edited["data"][0]["b64_json"]))).size == (256, 256)


@pytest.mark.parametrize(
    "name, cancelled_in, must_not_run",
    [
        ("flux1-dev", "transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"),
        ("flux-2-klein-4b", "transformer.single_transformer_blocks.0", "transformer.single_transformer_blocks.1"),
        ("z_image_turbo_bf16", "transformer.layers.0", "transformer.layers.1"),
        ("z_image_turbo_bf16", "text_encoder.layers.0", "text_encoder.layers.1"),  # Qwen3, as the prompt is read
        ("flux1-schnell", "text_encoder_2.encoder.block.0", "text_encoder_2.encoder.block.1"),  # T5
    ],
)
def test_a_cancel_stops_a_flow_model_at_the_next_block_not_at_the_end_of_its_step(
    flow_client, flow_engine, name, cancelled_in, must_not_run
):
    before = generate(flow_client, model=name)["img"]  # loads the model
    model = flow_engine.models.loaded[flow_engine.catalog.resolve(name)]
    ran_after = []
    cancel = module_at(model, cancelled_in).register_forward_pre_hook(
        lambda module, args: flow_engine.running.cancel(ImagineError("cancelled", 499))
    )
    later = module_at(model, must_not_run).register_forward_pre_hook(
        lambda module, args: ran_after.append(module) if flow_engine.running.cancelled() else None
    )
    try:
        # A prompt of its own: one encoded before is found in the model's encodings, and its encoder does not run.
        job = flow_engine.submit(parse_request({"prompt": f"p {cancelled_in}", "model": name, **SMALL}))
        events = list(job)
    finally:
        cancel.remove()
        later.remove()
    assert isinstance(events[-1], Failed) and events[-1].cancelled
    assert ran_after == []  # stopped at the next cancel point, inside the step or the encoding
    assert generate(flow_client, model=name)["img"] == before  # and the next request draws as before


def test_the_cli_draws_a_flow_model_through_the_server(over_loopback, tmp_path):
    result = subprocess.run(
        [sys.executable, str(Path(imagine.__file__).parent / "imagine-cli.py"), "a fox", "--model", "flux1-schnell",
         "-w", "64", "-h", "64", "--server", over_loopback, "-o", str(tmp_path / "fox.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "fox.png").size == (64, 64)


def test_the_web_page_offers_a_flow_models_own_steps_guidance_and_samplers_and_draws_with_it(over_loopback, browser):
    open_page(browser, over_loopback)
    Select(element(browser, "model")).select_by_value("z_image_turbo_bf16")
    wait_until(lambda: element(browser, "num_steps").get_attribute("value") == "8", "the page took Z-Image's steps")
    assert element(browser, "guidance").get_attribute("value") == "0"
    assert [option.text for option in Select(element(browser, "sampler")).options] == ["euler", "euler a", "dpm++ 2m"]
    fill_form(browser, "a lighthouse at dusk", steps=2, seed=5)
    element(browser, "generate").click()
    wait_until(lambda: finished(browser), "the page finished the picture")
    assert element(browser, "error").text == ""
