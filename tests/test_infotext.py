"""Pasted A1111 generation data (`parameters` on /generate): read into the request's fields, refused clearly when
it is garbage, and a saved picture's own data redraws it exactly."""

import contextlib
import time

import numpy as np
import pytest
from conftest import FAST, decode_png, pixels

from engine.errors import ImagineError
from engine.families import FAMILIES
from engine.infotext import infotext_fields
from engine.request import for_family, parse_request

CIVITAI = """masterpiece, a lighthouse at dawn, <lora:add_detail:0.5>
on a cliff
Negative prompt: blurry, (worst quality:1.4)
lowres
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 18446744073709551615, Size: 512x768, \
Model hash: 15012c538f, Model: realisticVision, Clip skip: 2, ENSD: 31337, \
Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1"""


def test_a_civitai_infotext_sets_every_field_it_names():
    fields, ignored = infotext_fields(CIVITAI)
    assert fields == {
        "prompt": "masterpiece, a lighthouse at dawn, <lora:add_detail:0.5>\non a cliff",
        "neg": "blurry, (worst quality:1.4)\nlowres",
        "num_steps": 30,
        "sampler": "DPM++ 2M",
        "schedule": "Karras",
        "guidance": 6.5,
        "seed": 2**64 - 1,
        "width": 512,
        "height": 768,
        "model": "realisticVision",
        "clip_skip": 2,
        "rng": "gpu",  # no RNG key: A1111's default
    }
    assert ignored == ["Model hash", "ENSD", "Version"]


def test_forges_distilled_cfg_scale_is_flux1_devs_guidance_and_leaves_other_models_their_cfg_scale():
    forge = "a fox\nSteps: 20, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1, Size: 896x1152"
    req = parse_request({"parameters": forge})
    assert req.parameters_ignored == []
    assert for_family(req, FAMILIES["flux1-dev"], 2048).guidance == 3.5
    assert for_family(req, FAMILIES["sdxl"], 2048).guidance == 1


def test_the_request_takes_the_infotexts_fields_where_the_body_leaves_them_out():
    req = parse_request({"parameters": CIVITAI, "num_steps": 4, "model": "demo"})
    assert (req.num_steps, req.model, req.sampler, req.schedule, req.seed) == (
        4,
        "demo",
        "dpm++ 2m",
        "karras",
        2**64 - 1,
    )
    assert (req.width, req.height, req.guidance, req.clip_skip, req.rng) == (512, 768, 6.5, 2, "gpu")
    assert req.loras == [("add_detail", 0.5)]
    assert req.parameters_ignored == ["Model hash", "ENSD", "Version"]


def test_data_from_before_schedule_types_draws_the_uniform_schedule_a1111_drew_then():
    req = parse_request({"parameters": "a cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 64x64"})
    assert (req.sampler, req.schedule) == ("dpm++ 2m", "uniform")
    req = parse_request({"parameters": "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64"})
    assert (req.sampler, req.schedule) == ("ddim", "automatic")


def test_an_older_combined_sampler_name_and_an_rng_are_read():
    req = parse_request({"parameters": "a cat\nSteps: 20, Sampler: Euler a Karras, CFG scale: 7, Seed: 1, RNG: NV"})
    assert (req.sampler, req.schedule, req.rng) == ("euler a", "karras", "nv")


def refusal(body: dict) -> str:
    with pytest.raises(ImagineError) as caught:
        parse_request(body)
    assert caught.value.status == 400
    return caught.value.message


@pytest.mark.parametrize(
    "text, message",
    [
        ("just a prompt, no settings", "parameters has no settings line"),
        ("a cat\nSteps: 20, Sampler: Euler\nrandom junk", "a line after its settings line: 'random junk'"),
        ("a cat\nSteps: 20, Sampler: Euler, ###", "text that is no 'Key: value': '###'"),
        ("a cat\nSteps: twenty, Sampler: Euler", "Steps must be a whole number, not 'twenty'"),
        ("a cat\nSteps: 20, Size: big", "Size must be WIDTHxHEIGHT, not 'big'"),
        ("a cat\nSteps: 20, RNG: Quantum", "RNG must be CPU, GPU or NV, not 'Quantum'"),
        ("a cat\nSteps: 20, Seed: 1180591620717411303424", "seed must be between 0 and 18446744073709551615"),
        ("a cat\nSteps: 20, Schedule type: Wobbly", "schedule 'Wobbly' is unknown"),
    ],
)
def test_garbage_in_the_infotext_is_refused_saying_what_is_wrong(text, message):
    assert message in refusal({"parameters": text})


def test_a_size_that_disagrees_with_the_width_given_beside_it_is_refused():
    error = refusal({"parameters": "a cat\nSteps: 20, Size: 512x768", "width": 640})
    assert error == "parameters' Size gives width 512, but width is 640"


def test_parameters_must_be_text():
    assert refusal({"parameters": 5}) == "parameters must be a string, not 5"


@pytest.mark.parametrize("fields", [{"sampler": "euler a", "rng": "nv"}, {"sampler": "dpm++ sde", "schedule": "beta"}])
def test_a_saved_pictures_own_parameters_pasted_back_redraw_it_exactly(client, fields):
    first = client.post("/generate", json={"prompt": "a (red:1.2) boat", "neg": "fog", **FAST, **fields}).get_json()
    text = decode_png(first["img"]).info["parameters"]
    again = client.post("/generate", json={"parameters": text}).get_json()
    assert np.array_equal(pixels(again["img"]), pixels(first["img"]))
    assert decode_png(again["img"]).info["parameters"] == text
    assert again["parameters_ignored"] == []


def test_the_answer_lists_the_keys_that_set_nothing(client):
    text = "a boat\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Hires upscale: 2, Version: v1.10.1"
    answer = client.post("/generate", json={"parameters": text}).get_json()
    assert answer["parameters_ignored"] == ["Hires upscale", "Version"]


@pytest.mark.parametrize(
    "setting, quoted",
    [('Sampler: "Euler', '"Euler'), ('Model: "a" b', '"a" b'), (r'Model: "a\q"', r'"a\q"')],
    ids=["unclosed", "text-after-it", "no-json-escape"],
)
def test_a_quoted_value_that_is_no_json_string_is_refused_quoting_it(setting, quoted):
    key = setting.partition(":")[0]
    error = refusal({"parameters": f"a cat\nSteps: 20, {setting}, Seed: 1"})
    assert error == f"parameters: {key}'s quoted value is no JSON string: {quoted!r}"


def test_a_quoted_value_may_have_spaces_before_its_comma():
    req = parse_request({"parameters": 'a cat\nSteps: 20, Model: "a, b" , Seed: 1'})
    assert (req.model, req.seed) == ("a, b", 1)


HOSTILE = {
    "unclosed-quote-of-backslashes": 'a cat\nSteps: "' + "\\" * 200_000,
    "spaces": "a cat\n" + " " * 200_000,
    "spaces-after-a-colon": "a cat\nSteps:" + " " * 200_000 + "1",
    "words-without-colon": "a cat\nSteps: 20, " + "a " * 100_000 + "x",
    "many-quoted-values": "a cat\nSteps: 20, " + 'a: "x\\"y", ' * 20_000 + "b: 1",
    "many-items": "a cat\nSteps: 20, " + "a: 1, " * 30_000 + "b: 1",
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_pasted_data_built_to_backtrack_is_read_at_once(text):
    """The first two made a regex for png-info's reading backtrack for minutes (exponentially, quadratically); linear
    time reads each of these in milliseconds, and the bound only catches super-linear time."""
    started = time.perf_counter()
    with contextlib.suppress(ImagineError):
        parse_request({"parameters": text})
    assert time.perf_counter() - started < 2.0


def test_an_img2img_or_inpainting_infotext_sets_the_fields_of_drawing_from_a_picture():
    fields, ignored = infotext_fields(
        "a boat\nSteps: 20, Denoising strength: 0.6, Mask blur: 8, Inpaint area: Only masked, Masked area padding: 16"
    )
    from_a_picture = {key: fields[key] for key in ("strength", "mask_blur", "inpaint_area", "inpaint_padding")}
    assert from_a_picture == {"strength": 0.6, "mask_blur": 8, "inpaint_area": "masked", "inpaint_padding": 16}
    assert ignored == []


def test_an_inpaint_area_a1111_has_no_label_for_is_refused():
    error = refusal({"parameters": "a cat\nSteps: 20, Inpaint area: Everywhere"})
    assert error == "parameters: Inpaint area must be Whole picture or Only masked, not 'Everywhere'"
