"""A1111's generation data (engine/infotext.py): pasted as `parameters` on /generate, read into the request's fields
and refused clearly when it is garbage; written for every picture, it reads back as the same request, png-info reads it
as the strict reader does, and a saved picture's own data redraws it exactly."""

import contextlib
import json
import time

import numpy as np
import pytest
from conftest import FAST, decode_png, pixels
from PIL import Image

from engine.errors import ImagineError
from engine.files.families import FAMILIES
from engine.infotext import generation_parameters, infotext_fields, infotext_strings, settings_pairs, split_infotext
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


@pytest.mark.parametrize(
    "fields",
    [
        {"sampler": "euler a", "rng": "nv"},
        {"sampler": "dpm++ sde", "schedule": "beta"},
        {"sampler": "euler a", "hires_width": 96, "hires_steps": 2, "hires_strength": 0.6, "hires_sampler": "euler",
         "hires_upscaler": "Nearest"},  # the hires fix's own sampler, a resize and a picture upscaler
        {"hires_scale": 2, "hires_steps": 2, "hires_prompt": 'a "tall" (barn:1.2)\nat dusk', "hires_neg": "",
         "hires_guidance": 4},  # the second pass's own prompts (quoted, an empty one too) and guidance
    ],
)  # fmt: skip
def test_a_saved_pictures_own_parameters_pasted_back_redraw_it_exactly(client, fields):
    first = client.post("/generate", json={"prompt": "a (red:1.2) boat", "neg": "fog", **FAST, **fields}).get_json()
    text = decode_png(first["img"]).info["parameters"]
    again = client.post("/generate", json={"parameters": text}).get_json()
    assert np.array_equal(pixels(again["img"]), pixels(first["img"]))
    assert decode_png(again["img"]).info["parameters"] == text
    assert again["parameters_ignored"] == []


def test_the_answer_lists_the_keys_that_set_nothing(client):
    text = "a boat\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Face restoration: CodeFormer, Version: v1.10.1"
    answer = client.post("/generate", json={"parameters": text}).get_json()
    assert answer["parameters_ignored"] == ["Face restoration", "Version"]


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


# ---- Round trips: what the writer writes, both readers read back

PICTURE, MASK = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
# The fields a request draws with; distilled_guidance is left out: for_family draws FLUX.1-dev with it as guidance.
DRAWN = (
    *("prompt", "neg", "model", "width", "height", "num_steps", "guidance", "sampler", "schedule", "rng", "seed"),
    *("strength", "mask_blur", "inpaint_area", "inpaint_padding", "clip_skip", "loras"),
    *("variation_seed", "variation_strength", "seed_resize_from_width", "seed_resize_from_height", "tiling"),
)
ROUND_TRIPS = {
    "sd": (
        "sd1",
        {
            "prompt": "a (red:1.2) boat\non two lines",
            "neg": "fog, rain\nsmoke",
            "num_steps": 30,
            "guidance": 6.5,
            "sampler": "dpm++ 2m",
            "schedule": "karras",
            "width": 512,
            "height": 768,
        },
    ),
    "sdxl-clip-skip-nv": ("sdxl", {"prompt": "a fox", "clip_skip": 2, "rng": "nv", "sampler": "euler a"}),
    "sd-gpu-beta": ("sd1", {"prompt": "a cat: grey, small", "rng": "gpu", "sampler": "dpm++ sde", "schedule": "beta"}),
    "variation-seeds-and-tiling": (
        "sd1",
        {"prompt": "tiles", "schedule": "karras", "variation_seed": 7, "variation_strength": 0.25, "tiling": True}
        | {"seed_resize_from_width": 512, "seed_resize_from_height": 768},
    ),
    "img2img": ("sd1", {"prompt": "a harbour", "img": PICTURE, "strength": 0.6, "schedule": "exponential"}),
    "inpaint-only-masked": (
        "sd1-inpaint",
        {
            "prompt": "a boat",
            "img": PICTURE,
            "mask": MASK,
            "mask_blur": 8,
            "inpaint_area": "masked",
            "inpaint_padding": 16,
            "sampler": "euler",
        },
    ),
    "inpaint-whole": (
        "sd1-inpaint",
        {"prompt": "a boat", "img": PICTURE, "mask": MASK, "mask_blur": 0, "sampler": "ddim"},
    ),
    "flux1-dev": ("flux1-dev", {"prompt": "a fox", "guidance": 3.5, "width": 896, "height": 1152}),
    "flux1-schnell": ("flux1-schnell", {"prompt": "a fox", "neg": "blur", "sampler": "dpm++ 2m"}),
    "z-image": ("z-image", {"prompt": "a fox", "guidance": 2.5, "rng": "cpu"}),
    "flux2-klein": ("flux2-klein", {"prompt": "a fox", "width": 768, "height": 1024}),
}


def written(family_name: str, fields: dict, lora_hashes: dict | None = None, cut: tuple | None = None) -> tuple:
    """(the request `fields` draw with on the family, and the infotext its picture carries)."""
    req = for_family(parse_request({"model": "dreamshaper_8", "seed": 12345, **fields}), FAMILIES[family_name], 2048)
    return req, generation_parameters(req, req.model, FAMILIES[family_name], lora_hashes, cut)


def pasted(text: str, family_name: str, req):
    """The request the infotext draws with when pasted, with what it cannot carry (the picture, the mask) beside it."""
    beside = {key: getattr(req, key) for key in ("img", "mask") if getattr(req, key) is not None}
    return for_family(parse_request({"parameters": text, **beside}), FAMILIES[family_name], 2048)


def drawn_fields(req) -> dict:
    return {field: getattr(req, field) for field in DRAWN}


@pytest.mark.parametrize("family_name, fields", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_a_written_infotext_reads_back_as_the_same_request(family_name, fields):
    req, text = written(family_name, fields)
    again = pasted(text, family_name, req)
    assert again.parameters_ignored == []
    assert drawn_fields(again) == drawn_fields(req)
    assert generation_parameters(again, again.model, FAMILIES[family_name]) == text


@pytest.mark.parametrize("family_name, fields", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_png_info_reads_a_written_infotext_as_the_strict_reader_does(family_name, fields):
    req, text = written(family_name, fields)
    strings = infotext_strings(text)
    assert (strings.pop("Prompt"), strings.pop("Negative prompt")) == (req.prompt, req.neg)
    assert (strings.pop("Size-1"), strings.pop("Size-2")) == (str(req.width), str(req.height))
    assert (strings["Steps"], strings["Seed"], strings["Model"]) == (str(req.num_steps), "12345", "dreamshaper_8")
    unquoted = {key: json.loads(value) if value.startswith('"') else value for key, value in strings.items()}
    assert unquoted == settings_pairs(split_infotext(text)[2])


def test_png_info_answers_an_inpainting_pictures_infotext_as_its_strings():
    _, text = written("sd1-inpaint", {"prompt": "a boat", "img": PICTURE, "mask": MASK, "inpaint_area": "masked"})
    assert infotext_strings(text) == {
        "Prompt": "a boat",
        "Negative prompt": "",
        "Steps": "25",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.0",
        "Seed": "12345",
        "Size": "64x64",
        "Model": "dreamshaper_8",
        "Denoising strength": "0.75",
        "Mask blur": "4",
        "Inpaint area": "Only masked",
        "Masked area padding": "32",
        "RNG": "CPU",
        "Size-1": "64",
        "Size-2": "64",
    }


def test_variation_seeds_and_tiling_are_written_as_a1111_writes_them():
    _, text = written("sd1", ROUND_TRIPS["variation-seeds-and-tiling"][1])
    variation = "Variation seed: 7, Variation seed strength: 0.25, Seed resize from: 512x768"
    assert f", Model: dreamshaper_8, {variation}, " in text
    assert text.endswith(", RNG: CPU, Tiling: True")


def test_no_variation_seed_is_written_at_strength_0_as_a1111_leaves_it_out():
    _, text = written("sd1", {"prompt": "a cat", "variation_seed": 7})
    assert "Variation" not in text and "Tiling" not in text


def test_an_automatic_schedule_is_written_as_the_one_drawn_and_reads_back_as_it():
    req, text = written("sd1", {"prompt": "a cat", "sampler": "dpm++ 2m"})
    assert req.schedule == "automatic" and "Sampler: DPM++ 2M, Schedule type: Karras, " in text
    assert pasted(text, "sd1", req).schedule == "karras"


def test_flux1_devs_distilled_guidance_is_written_as_forge_writes_it_and_read_back_as_its_guidance():
    req, text = written("flux1-dev", {"prompt": "a fox", "guidance": 3.5})
    assert "Schedule type: Automatic, CFG scale: 1.0, Distilled CFG Scale: 3.5, " in text
    assert (parse_request({"parameters": text}).guidance, pasted(text, "flux1-dev", req).guidance) == (1.0, 3.5)
    assert infotext_strings(text)["Distilled CFG Scale"] == "3.5"


def test_lora_hashes_are_written_quoted_and_the_prompts_tags_load_the_same_loras_again():
    hashes = {"add_detail": "7c6bad76eb54", "styles/ink": "0123456789ab"}
    req, text = written("sd1", {"prompt": "a cat <lora:add_detail:0.5> <lora:styles/ink:-1>"}, lora_hashes=hashes)
    assert text.endswith(', Lora hashes: "add_detail: 7c6bad76eb54, styles/ink: 0123456789ab"')
    again = pasted(text, "sd1", req)
    assert again.parameters_ignored == [] and again.loras == req.loras == [("add_detail", 0.5), ("styles/ink", -1.0)]
    assert infotext_strings(text)["Lora hashes"] == '"add_detail: 7c6bad76eb54, styles/ink: 0123456789ab"'


def test_an_interrupted_pictures_infotext_reads_back_with_the_steps_it_ran():
    req, text = written("sd1", {"prompt": "a boat", "num_steps": 8, "schedule": "karras"}, cut=(3, 8))
    assert text.endswith(", RNG: CPU, Interrupted: after step 3 of 8") and "\nSteps: 3, " in text
    again = pasted(text, "sd1", req)
    assert again.parameters_ignored == ["Interrupted"]
    assert drawn_fields(again) == drawn_fields(req) | {"num_steps": 3}
    assert (infotext_strings(text)["Steps"], infotext_strings(text)["Interrupted"]) == ("3", "after step 3 of 8")


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
