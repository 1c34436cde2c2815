"""Inpainting: a mask beside img (white repaints, black keeps), A1111's blur and "only masked", and inpainting
checkpoints (a 9-channel UNet) of SD1, SD2 and SDXL written in the original layout and loaded offline."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, decode_png, noise_picture, pixels, png_data, run_cli, save_tiny_folder, square_mask
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from ldm_checkpoint import ldm_shapes, save_ldm_checkpoint
from PIL import Image, ImageFilter
from safetensors.torch import save_file
from tiny_pipelines import save_configs, tiny_sd2, tiny_sdxl, tiny_unet

import imagine
from engine.demo import build_demo_pipeline
from engine.engine import Engine
from engine.fields import MAX_IMG_PIXELS
from engine.files.families import FAMILIES, FAMILY_KEY_PREFIXES, UNET_CONV_IN, folder_family
from engine.models import Models
from engine.pipeline import crop_box
from engine.settings import CONFIGS_DIR

STEPS = {"num_steps": 4, "seed": 42}


def inpaint(client, img, mask, **fields):
    body = {"prompt": "a red ball", "img": png_data(img), "mask": png_data(mask), **STEPS, **fields}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def untouched(mask: Image.Image, blur: int) -> np.ndarray:
    """Where the blurred mask is zero: the pixels that must stay the input's."""
    blurred = mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask
    return np.asarray(blurred) == 0


@pytest.mark.parametrize("area", ["whole", "masked"])
def test_pixels_outside_the_blurred_mask_are_the_inputs_exactly_and_inside_are_repainted(client, area):
    img, mask = noise_picture(), square_mask()
    answer = inpaint(client, img, mask, inpaint_area=area)
    out, keep = pixels(answer["img"]), untouched(mask, 4)
    assert np.array_equal(out[keep], np.asarray(img, dtype=np.int16)[keep])
    assert not np.array_equal(out[24:40, 24:40], np.asarray(img, dtype=np.int16)[24:40, 24:40])


def test_mask_blur_zero_keeps_every_pixel_outside_the_sharp_mask(client):
    img, mask = noise_picture(), square_mask()
    out = pixels(inpaint(client, img, mask, mask_blur=0)["img"])
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(img, dtype=np.int16)[keep])
    assert not untouched(mask, 4)[22, 30]  # a pixel the default blur would have let change


def test_a_mask_of_another_size_and_mode_is_converted_and_resized_to_the_picture(client):
    img = noise_picture()
    small_rgba = square_mask((32, 32), (12, 12, 20, 20)).convert("RGBA")
    out = pixels(inpaint(client, img, small_rgba)["img"])
    resized = square_mask((32, 32), (12, 12, 20, 20)).resize((64, 64), Image.Resampling.LANCZOS)
    keep = untouched(resized, 4)
    assert np.array_equal(out[keep], np.asarray(img, dtype=np.int16)[keep])


def test_a_grey_mask_repaints_partly(client):
    img, grey = noise_picture(), square_mask(box=(0, 0, 64, 64)).point(lambda _: 128)
    white = square_mask(box=(0, 0, 64, 64))
    half, full = pixels(inpaint(client, img, grey, mask_blur=0)["img"]), pixels(inpaint(client, img, white)["img"])
    source = np.asarray(img, dtype=np.int16)
    assert 0 < np.abs(half - source).mean() < np.abs(full - source).mean()


def test_only_masked_generates_the_region_at_the_request_size_and_pastes_it_into_the_full_picture(client):
    img, mask = noise_picture(256, 256), square_mask((256, 256), (120, 120, 136, 136))
    masked = inpaint(client, img, mask, inpaint_area="masked", width=64, height=64)
    whole = inpaint(client, img, mask, width=64, height=64)
    assert (masked["width"], masked["height"]) == (256, 256)  # the full picture comes back
    assert (whole["width"], whole["height"]) == (64, 64)  # the whole picture is generated at the request size
    keep = untouched(mask, 4)
    assert np.array_equal(pixels(masked["img"])[keep], np.asarray(img, dtype=np.int16)[keep])


def test_the_only_masked_region_is_the_box_plus_padding_widened_to_the_request_aspect():
    mask = square_mask((256, 256), (120, 120, 136, 136))
    assert crop_box(mask, 32, (64, 64)) == (88, 88, 168, 168)
    assert crop_box(mask, 32, (128, 64)) == (48, 88, 208, 168)
    assert crop_box(square_mask((256, 256), (0, 0, 8, 8)), 8, (128, 64)) == (0, 0, 32, 16)


def test_strength_defaults_to_075_with_a_mask_and_the_png_says_mask_blur_and_inpaint_area(client):
    img, mask = noise_picture(), square_mask()
    answer = inpaint(client, img, mask, inpaint_area="masked")
    settings = decode_png(answer["img"]).info["parameters"].splitlines()[-1]
    assert "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32" in settings
    assert answer["img"] == inpaint(client, img, mask, inpaint_area="masked", strength=0.75)["img"]
    plain = decode_png(inpaint(client, img, mask)["img"]).info["parameters"]
    assert plain.endswith("Denoising strength: 0.75, Mask blur: 4, RNG: CPU")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mask": png_data(square_mask())}, "mask needs img"),
        ({"img": png_data(noise_picture()), "mask": "bm90IGFuIGltYWdl"}, "mask is not a picture in a format accepted"),
        ({"img": png_data(noise_picture()), "mask": "???"}, "mask is not valid base64"),
        (
            {"img": png_data(noise_picture()), "mask": png_data(Image.new("1", (5000, 5000)))},
            f"mask is 5000x5000; at most {MAX_IMG_PIXELS} pixels are accepted",
        ),
        ({"img": png_data(noise_picture()), "mask": png_data(square_mask(box=(0, 0, 0, 0)))}, "mask is all black"),
        (
            {"img": png_data(noise_picture()), "mask": png_data(square_mask()), "inpaint_area": "only masked"},
            "inpaint_area must be one of: whole, masked, not 'only masked'",
        ),
        ({"img": png_data(noise_picture()), "mask": png_data(square_mask()), "mask_blur": -1}, "mask_blur must be"),
        (
            {"img": png_data(noise_picture()), "mask": png_data(square_mask()), "inpaint_padding": 1000},
            "inpaint_padding must be between 0 and 256, not 1000",
        ),
    ],
)
def test_bad_mask_fields_are_refused_naming_the_field_and_value(client, fields, message):
    response = client.post("/generate", json={"prompt": "x", **FAST, **fields})
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_sdxl_inpaints_with_its_own_pipeline_built_from_the_loaded_modules(make_engine, tmp_path):
    tiny_sdxl().save_pretrained(tmp_path / "xl")
    engine = make_engine(models_dir=tmp_path, fp_prec="32")
    client = imagine.create_app(engine).test_client()
    img, mask = noise_picture(), square_mask()
    out = pixels(inpaint(client, img, mask, model="xl")["img"])
    keep = untouched(mask, 4)
    assert np.array_equal(out[keep], np.asarray(img, dtype=np.int16)[keep])
    model = engine.models.get(engine.catalog.resolve("xl"))
    assert isinstance(model.inpaint, StableDiffusionXLInpaintPipeline)
    assert model.inpaint.unet is model.txt2img.unet and model.inpaint.vae is model.txt2img.vae  # no second copy


def test_an_sd1_diffusers_folder_inpaints_with_the_same_modules(engine):
    model = engine.models.get("demo")
    assert isinstance(model.inpaint, StableDiffusionInpaintPipeline)
    assert model.inpaint.unet is model.txt2img.unet and model.inpaint.text_encoder is model.txt2img.text_encoder


# ---------------------------------------------------------------------------------------------
# Inpainting checkpoints: a 9-channel UNet (the latents, the mask, the masked picture's latents)
# ---------------------------------------------------------------------------------------------


def nine_channels(pipe, cls):
    """The pipeline with a UNet of the same shape that takes 9 input channels, as an inpainting model's does."""
    torch.manual_seed(2)
    config = {key: value for key, value in pipe.unet.config.items() if key != "_use_default_values"}
    config["in_channels"] = 9
    return cls(**{**pipe.components, "unet": type(pipe.unet).from_config(config)})


@pytest.fixture(scope="module")
def inpainting_checkpoints(tmp_path_factory):
    """SD1, SD2 and SDXL inpainting checkpoints, tiny, in the original layout, and a configs root that fits them."""
    root = tmp_path_factory.mktemp("inpainting")
    models, configs = root / "models", root / "configs"
    models.mkdir()
    sd1 = build_demo_pipeline(CONFIGS_DIR / "sd1", seed=3)
    sd1.unet = tiny_unet(cross_attention_dim=32)
    sources = {
        "sd1": nine_channels(sd1, StableDiffusionInpaintPipeline),
        "sd2": nine_channels(tiny_sd2("epsilon"), StableDiffusionInpaintPipeline),
        "sdxl": nine_channels(tiny_sdxl(), StableDiffusionXLInpaintPipeline),
    }
    for family, pipe in sources.items():
        save_configs(pipe, configs / f"{family}-inpaint")
        save_ldm_checkpoint(pipe, models / f"{family}-inpainting.safetensors", family=family)
    return models, configs


@pytest.fixture(scope="module")
def inpainting_engine(inpainting_checkpoints):
    models, configs = inpainting_checkpoints
    settings = imagine.Settings(model="sd1-inpainting", models_dir=models, max_loaded=1, fp_prec="32")
    engine = Engine(settings, configs_dir=configs)
    engine.start()
    return engine


def test_inpainting_checkpoints_are_recognised_from_their_first_convolution(inpainting_engine):
    listed = inpainting_engine.catalog.listing()
    families = {model["name"]: model["family"] for model in listed if not model["builtin"]}
    assert families == {
        "sd1-inpainting": "sd1-inpaint",
        "sd2-inpainting": "sd2-inpaint",
        "sdxl-inpainting": "sdxl-inpaint",
    }


@pytest.mark.parametrize("name", ["sd1-inpainting", "sd2-inpainting", "sdxl-inpainting"])
def test_an_inpainting_checkpoint_loads_offline_and_serves_txt2img_img2img_and_inpaint(
    inpainting_engine, no_network, name
):
    client = imagine.create_app(inpainting_engine).test_client()
    txt2img = client.post("/generate", json={"prompt": "a cat", "model": name, **FAST})
    assert txt2img.status_code == 200, txt2img.get_json()
    picture = decode_png(txt2img.get_json()["img"])
    img2img = client.post("/generate", json={"prompt": "a cat", "model": name, "img": png_data(picture), **STEPS})
    assert img2img.status_code == 200, img2img.get_json()
    assert not np.array_equal(pixels(img2img.get_json()["img"]), pixels(txt2img.get_json()["img"]))
    mask = square_mask()
    out = pixels(inpaint(client, picture, mask, model=name)["img"])
    keep = untouched(mask, 4)
    assert np.array_equal(out[keep], np.asarray(picture, dtype=np.int16)[keep])
    assert inpainting_engine.models.get(inpainting_engine.catalog.resolve(name)).txt2img.unet.config.in_channels == 9


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_shipped_inpainting_configs_are_their_familys_with_a_9_channel_unet(family, tmp_path):
    base, inpainting = CONFIGS_DIR / family, CONFIGS_DIR / f"{family}-inpaint"
    unet = json.loads((inpainting / "unet" / "config.json").read_text())
    assert {**unet, "in_channels": 4} == json.loads((base / "unet" / "config.json").read_text())
    index = json.loads((inpainting / "model_index.json").read_text())
    assert index["_class_name"] == FAMILIES[f"{family}-inpaint"].txt2img.__name__
    # A checkpoint of the shipped shape, header only: the UNet's first convolution and the text encoder's names.
    shapes = ldm_shapes(inpainting, "sdxl" if family == "sdxl" else family)
    assert shapes[UNET_CONV_IN][1] == 9
    prefix = dict(FAMILY_KEY_PREFIXES)[family]
    text_key = next(key for key in shapes if key.startswith(prefix))
    save_file(
        {UNET_CONV_IN: torch.zeros(shapes[UNET_CONV_IN]), text_key: torch.zeros(1)},
        tmp_path / "x.safetensors",
    )
    models = Models(imagine.Settings(), torch.device("cpu"), torch.float32)
    assert models.catalog.family_of(str(tmp_path / "x.safetensors")).config == f"{family}-inpaint"


def test_a_folder_of_an_inpainting_model_is_recognised_too(tmp_path):
    save_tiny_folder(tmp_path / "tiny", seed=1)
    config = tmp_path / "tiny" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 9}))
    assert folder_family(tmp_path / "tiny").config == "sd1-inpaint"


def test_cli_mask_inpaints_the_img_it_is_given(live_server, tmp_path):
    img, mask = noise_picture(), square_mask()
    img.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    options = ["--img", "in.png", "--mask", "mask.png", "-n", "4", "-o", "out.png"]
    result = run_cli("a red ball", *options, cwd=tmp_path, server=live_server)
    assert result.returncode == 0, result.stderr
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), dtype=np.int16)
    keep = untouched(mask, 4)
    assert np.array_equal(out[keep], np.asarray(img, dtype=np.int16)[keep])
    assert not np.array_equal(out[24:40, 24:40], np.asarray(img, dtype=np.int16)[24:40, 24:40])
    assert "Mask blur: 4" in Image.open(tmp_path / "out.png").info["parameters"]
