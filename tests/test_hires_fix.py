"""The hires fix (issue 34): txt2img at width x height, upscaled, drawn again by img2img at the bigger size; with
/generate's hires_* fields and A1111's enable_hr, on the tiny demo model (64x64 to 128x128, a few steps)."""

import json

import numpy as np
import pytest
import safetensors.torch
from conftest import decode_png, pixels
from jobs_client import events, stream, submit, wait_for
from upscaler_files import compact

import imagine
from engine.errors import ImagineError
from engine.files.families import FAMILIES
from engine.hires import hires_size
from engine.request import GenerationRequest, for_family

FIRST = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_steps": 3, "seed": 3, "sampler": "euler"}
# The second pass runs 2 steps of a schedule of int(2 / 0.5) = 4: five steps in all.
HIRES = {**FIRST, "hires_scale": 2, "hires_steps": 2, "hires_strength": 0.5}
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 3}


def drawn(client, body) -> dict:
    answer = client.post("/generate", json=body)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


@pytest.mark.parametrize(
    "upscaler", ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest-exact)", "None", "Lanczos",
                 "Nearest"]
)  # fmt: skip
def test_the_hires_fix_draws_the_picture_at_twice_the_size_with_each_upscaler(client, upscaler):
    image = decode_png(drawn(client, {**HIRES, "hires_upscaler": upscaler})["images"][0])
    assert image.size == (128, 128)
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: " + upscaler in image.info["parameters"]


@pytest.mark.parametrize(
    "fields, size",
    [
        ({"hires_scale": 1.5}, (96, 144)),
        ({"hires_width": 128}, (128, 192)),  # the other side keeps the aspect ratio
        ({"hires_height": 128}, (80, 128)),  # 85 wide, as A1111 computes it: its latents are 10 wide
        ({"hires_width": 128, "hires_height": 128}, (128, 128)),  # scaled to cover, then cropped
    ],
)
def test_the_hires_size_follows_a1111s_rules(fields, size):
    req = GenerationRequest(prompt="x", width=64, height=96, **fields)
    assert hires_size(req) == size


def test_progress_counts_both_passes_steps_and_previews_go_on_through_the_second_at_the_final_size(client):
    job_id = submit(client, HIRES, preview="fast")["id"]
    with stream(client, job_id, "?every=1") as response:
        got = list(events(response))
    progress = [(data["step"], data["steps"]) for _, kind, data in got if kind == "progress"]
    assert progress == [(step, 5) for step in range(1, 6)]
    previews = [(data["step"], decode_png(data["img"]).size) for _, kind, data in got if kind == "preview"]
    assert previews == [(step, (128, 128)) for step in range(1, 5)]  # the last step is the finished picture
    assert got[-1][1] == "done"


@pytest.mark.parametrize("at", [2, 4])  # a step of the first pass, one of the second
def test_cancelling_a_hires_job_stops_it_in_either_pass(make_engine, hold, at):
    held = hold(at)
    engine = make_engine(model="demo", generate=held.generate)
    client = imagine.create_app(engine).test_client()
    submitted = submit(client, HIRES)
    held.reached(at)
    assert client.delete(f"/jobs/{submitted['id']}").status_code == 202
    held.release()
    assert wait_for(client, submitted["id"], "cancelled")["error"].startswith("cancelled by DELETE")
    assert held.steps == list(range(1, at + 1))


def test_a_hires_pictures_pasted_parameters_draw_the_same_picture(client):
    first = drawn(client, {**HIRES, "hires_upscaler": "Latent (bicubic)"})["images"][0]
    parameters = decode_png(first).info["parameters"]
    assert "Size: 64x64" in parameters and "Denoising strength: 0.5" in parameters
    answer = drawn(client, {"parameters": parameters})
    again = answer["images"][0]
    assert decode_png(again).size == (128, 128) and answer["parameters_ignored"] == []
    assert (pixels(again) == pixels(first)).all()


def test_a_second_pass_prompt_or_negative_prompt_changes_the_picture_and_one_equal_to_the_first_passes_does_not(
    client,
):
    plain = pixels(drawn(client, HIRES)["images"][0])
    same = drawn(client, {**HIRES, "hires_prompt": "a lighthouse", "hires_neg": ""})["images"][0]
    assert (pixels(same) == plain).all()
    assert "Hires prompt" not in decode_png(same).info["parameters"]
    for fields in ({"hires_prompt": "a red barn"}, {"hires_negative_prompt": "fog"}):
        assert not (pixels(drawn(client, {**HIRES, **fields})["images"][0]) == plain).all(), fields


def test_a_second_pass_guidance_changes_the_picture_and_the_first_passes_does_not(client):
    plain = pixels(drawn(client, {**HIRES, "guidance": 7})["images"][0])
    assert (pixels(drawn(client, {**HIRES, "guidance": 7, "hires_guidance": 7})["images"][0]) == plain).all()
    assert not (pixels(drawn(client, {**HIRES, "guidance": 7, "hires_guidance": 2})["images"][0]) == plain).all()


def test_pasted_parameters_with_a_second_pass_prompt_and_guidance_draw_the_same_picture(client):
    own = {"hires_prompt": "a red barn, at dusk", "hires_neg": "fog", "hires_guidance": 3}
    first = drawn(client, {**HIRES, **own})["images"][0]
    parameters = decode_png(first).info["parameters"]
    assert 'Hires prompt: "a red barn, at dusk", Hires negative prompt: fog, Hires CFG Scale: 3.0' in parameters
    answer = drawn(client, {"parameters": parameters})
    assert answer["parameters_ignored"] == [] and (pixels(answer["images"][0]) == pixels(first)).all()
    assert not (pixels(drawn(client, HIRES)["images"][0]) == pixels(first)).all()


def test_a_pasted_model_upscaler_draws_with_latent_and_says_so(client):
    parameters = (
        "a lighthouse\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, "
        "Hires upscaler: R-ESRGAN 4x+"
    )
    answer = drawn(client, {"parameters": parameters})
    assert decode_png(answer["images"][0]).size == (128, 128) and answer["parameters_ignored"] == ["Hires upscaler"]
    assert "Hires upscaler: Latent" in decode_png(answer["images"][0]).info["parameters"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hires_scale": 0}, "hires_scale must be more than 0"),
        ({"hires_scale": -2}, "hires_scale must be between"),
        ({"hires_scale": 40}, "hires_scale 40.0 makes 2560x2560 from 64x64"),
        ({"hires_width": 4096}, "hires_width must be between 0 and 2048"),
        ({"hires_scale": 2, "hires_strength": 0}, "hires_strength must be more than 0"),
        ({"hires_scale": 2, "hires_sampler": "fast"}, "hires_sampler 'fast' is unknown"),
        ({"hires_scale": 2, "hires_prompt": 5}, "hires_prompt must be a string, not 5"),
        ({"hires_scale": 2, "hires_neg": "(fog:1.2.3)"}, "hires_neg weight '1.2.3' is not a number"),
        ({"hires_scale": 2, "hires_guidance": 1000}, "hires_guidance must be between 0.0 and 30.0, not 1000"),
    ],
)
def test_bad_hires_fields_are_refused_naming_the_field_and_value(client, fields, message):
    answer = client.post("/generate", json={**FIRST, **fields})
    assert answer.status_code == 400 and answer.get_json()["error"].startswith(message), answer.get_json()


@pytest.fixture
def upscaler_client(make_engine, tmp_path):
    """A client of an engine whose models folder holds one upscaler model, a tiny Real-ESRGAN Compact of scale 2."""
    (tmp_path / "upscale_models").mkdir()
    safetensors.torch.save_file(compact(scale=2), tmp_path / "upscale_models" / "tiny-compact-2x.safetensors")
    return imagine.create_app(make_engine(model="demo", models_dir=tmp_path)).test_client()


def test_an_upscaler_model_upscales_between_the_passes_for_native_and_a1111_clients(upscaler_client):
    answer = drawn(upscaler_client, {**HIRES, "hires_upscaler": "tiny-compact-2x"})
    picture = decode_png(answer["images"][0])
    assert picture.size == (128, 128) and "Hires upscaler: tiny-compact-2x" in picture.info["parameters"]
    lanczos = drawn(upscaler_client, {**HIRES, "hires_upscaler": "Lanczos"})
    assert np.abs(pixels(answer["images"][0]) - pixels(lanczos["images"][0])).mean() > 1
    body = {"prompt": "a cat", "enable_hr": True, "hr_upscaler": "tiny-compact-2x", **SMALL}
    info = json.loads(upscaler_client.post("/sdapi/v1/txt2img", json=body).get_json()["info"])
    assert "Hires upscaler: tiny-compact-2x" in info["infotexts"][0] and info["imagine_ignored"] == []


def test_a_pasted_upscaler_model_the_folders_have_draws_with_it(upscaler_client):
    parameters = (
        "a lighthouse\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, "
        "Hires upscaler: tiny-compact-2x"
    )
    answer = drawn(upscaler_client, {"parameters": parameters})
    assert answer["parameters_ignored"] == []
    assert "Hires upscaler: tiny-compact-2x" in decode_png(answer["images"][0]).info["parameters"]


def test_an_upscaler_model_the_folders_lack_is_refused_before_any_work_naming_the_field(upscaler_client):
    answer = upscaler_client.post("/generate", json={**HIRES, "hires_upscaler": "R-ESRGAN 4x+"})
    assert answer.status_code == 422
    assert answer.get_json()["error"].startswith(
        "hires_upscaler: no upscaler 'R-ESRGAN 4x+'; GET /upscalers lists them"
    )


def test_the_flow_families_are_refused_the_hires_fix_with_a_clear_error():
    req = GenerationRequest(prompt="x", width=512, height=512, hires_scale=2)
    with pytest.raises(ImagineError, match="hires fix is not supported for Z-Image models") as raised:
        for_family(req, FAMILIES["z-image"], 2048)
    assert raised.value.field == "hires_scale"


# ---- A1111's enable_hr


def test_a1111s_enable_hr_draws_the_upscaled_size_and_writes_a1111s_infotext(client):
    body = {"prompt": "a cat", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6,
            "hr_second_pass_steps": 2, "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras", **SMALL}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=body).get_json()
    assert decode_png(answer["images"][0]).size == (128, 128)
    info = json.loads(answer["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (128, 128, 0.6)
    assert "Size: 64x64" in info["infotexts"][0]
    assert (
        "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, Hires sampler: DPM++ 2M, "
        "Hires schedule type: Karras" in info["infotexts"][0]
    )
    assert info["imagine_ignored"] == []


def test_an_unknown_hr_upscaler_falls_back_to_latent_as_in_a1111_and_is_named_ignored(client):
    body = {"prompt": "a cat", "enable_hr": True, "hr_upscaler": "4x-UltraSharp", "hr_prompt": "a dog", **SMALL}
    answer = client.post("/sdapi/v1/txt2img", json=body).get_json()
    info = json.loads(answer["info"])
    assert decode_png(answer["images"][0]).size == (128, 128)  # hr_scale's default, 2
    assert "Hires upscaler: Latent" in info["infotexts"][0]
    assert info["imagine_ignored"] == ["hr_upscaler"]


def test_a1111s_hr_prompt_hr_negative_prompt_and_hr_cfg_draw_the_second_pass_and_are_not_ignored(client):
    body = {"prompt": "a cat", "enable_hr": True, "hr_prompt": "", "hr_negative_prompt": "", "cfg_scale": 7, **SMALL}
    plain = client.post("/sdapi/v1/txt2img", json=body).get_json()
    own = {"hr_prompt": "a dog, asleep", "hr_negative_prompt": "fog", "hr_cfg": 3}
    answer = client.post("/sdapi/v1/txt2img", json={**body, **own}).get_json()
    info = json.loads(answer["info"])
    assert info["imagine_ignored"] == [] and "Hires prompt" not in json.loads(plain["info"])["infotexts"][0]
    assert 'Hires prompt: "a dog, asleep", Hires negative prompt: fog, Hires CFG Scale: 3.0' in info["infotexts"][0]
    assert not (pixels(answer["images"][0]) == pixels(plain["images"][0])).all()


@pytest.mark.parametrize(
    "fields, detail",
    [({"hr_scale": 0}, "hr_scale must be more than 0"), ({"hr_scale": 40}, "hr_scale 40.0 makes 2560x2560 from 64x64")],
)
def test_a1111_hires_that_cannot_be_drawn_is_a_422_naming_hr_scale(client, fields, detail):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "enable_hr": True, **fields, **SMALL})
    assert answer.status_code == 422 and answer.get_json()["detail"].startswith(detail), answer.get_json()
