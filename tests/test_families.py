"""SDXL and SD2.x single-file checkpoints: tiny models written in the original key layouts, loaded back
offline through tiny config folders, and generated with; the family detector on real checkpoints' key sets."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, answer, bare_call, decode_png, pixels, png_data
from diffusers import (
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from ldm_checkpoint import ldm_shapes, save_ldm_checkpoint
from PIL import Image
from safetensors.torch import save_file

import imagine
from engine.files.families import FAMILIES, FAMILY_KEY_PREFIXES, SD_LATENT_RGB, SDXL_LATENT_RGB, detect_family
from engine.settings import CONFIGS_DIR


def same_weights(source, loaded, names):
    for name in names:
        expected, actual = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name


# ---- SDXL


def test_an_sdxl_single_file_loads_offline_with_identical_weights(tiny_engine, tiny_files, no_network):
    _, _, sources = tiny_files
    model = tiny_engine.models.get(tiny_engine.catalog.resolve("xl"))
    assert model.family.label == "SDXL"
    assert isinstance(model.txt2img, StableDiffusionXLPipeline)
    assert isinstance(model.img2img, StableDiffusionXLImg2ImgPipeline)
    same_weights(sources["sdxl"], model.txt2img, ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert model.txt2img.tokenizer_2.pad_token == "!"
    assert model.txt2img.vae.config.force_upcast  # float16 SDXL VAEs overflow; diffusers then decodes in fp32


def test_sdxl_draws_what_a_bare_diffusers_sdxl_call_draws(tiny_engine, tiny_files):
    _, _, sources = tiny_files
    pipe = sources["sdxl"]
    served = pixels(answer(tiny_engine, model="xl", width=64, height=96)["img"])
    assert np.array_equal(served, bare_call(pipe, pipe.scheduler.config, width=64, height=96))


def test_sdxl_defaults_to_1024_square_when_the_request_gives_no_size(tiny_engine):
    result = answer(tiny_engine, model="xl", width=None, height=None, num_steps=1)
    assert decode_png(result["img"]).size == (1024, 1024)


def test_sdxl_img2img_keeps_the_input_size(tiny_engine):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    result = answer(tiny_engine, model="xl", width=None, height=None, img=png_data(source), strength=0.5)
    assert decode_png(result["img"]).size == (96, 64)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_sdxl_draws_the_hires_fix_at_the_upscaled_size(tiny_engine, upscaler):
    fields = {"hires_scale": 1.5, "hires_steps": 1, "hires_upscaler": upscaler}
    result = answer(tiny_engine, model="xl", width=64, height=64, num_steps=2, **fields)
    assert decode_png(result["img"]).size == (96, 96) and result["steps"] == 3


def test_sdxl_streams_previews_made_with_the_sdxl_latent_factors(tiny_engine):
    client = imagine.create_app(tiny_engine).test_client()
    response = client.post("/generate", json={"prompt": "a cat", **FAST, "model": "xl", "width": 96, "stream": 2})
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert [line["done"] for line in lines] == [False, True]
    assert decode_png(lines[0]["img"]).size == (96, 64)
    assert tiny_engine.models.get(tiny_engine.catalog.resolve("xl")).family.latent_rgb == SDXL_LATENT_RGB
    assert SDXL_LATENT_RGB != SD_LATENT_RGB


# ---- SD2


@pytest.mark.parametrize(
    "name, family, prediction",
    [
        ("sd2-plain", "sd2-v", "v_prediction"),  # no .yaml beside it: the 768-v default
        ("sd2-eps", "sd2", "epsilon"),  # a .yaml without `parameterization: "v"`
        ("sd2-v", "sd2-v", "v_prediction"),
    ],
)
def test_an_sd2_single_file_gets_its_prediction_type_from_the_yaml_beside_it(
    tiny_engine, tiny_files, no_network, name, family, prediction
):
    _, _, sources = tiny_files
    model = tiny_engine.models.get(tiny_engine.catalog.resolve(name))
    assert model.family is FAMILIES[family]
    assert model.scheduler_config["prediction_type"] == prediction
    same_weights(sources["sd2"], model.txt2img, ("unet", "vae", "text_encoder"))
    assert model.txt2img.tokenizer.pad_token == "!"


def test_a_yaml_put_beside_an_sd2_file_or_a_folders_edited_scheduler_changes_its_family_at_the_next_request(
    tiny_engine, tiny_files, tmp_path
):
    """Loaded or not: the defaults a request gets (known_family) and the model it draws with (get) change together."""
    _, _, sources = tiny_files
    models = tiny_engine.models
    checkpoint = str(tmp_path / "later.safetensors")
    save_ldm_checkpoint(sources["sd2"], Path(checkpoint), family="sd2")
    assert models.catalog.known_family(checkpoint) is models.get(checkpoint).family is FAMILIES["sd2-v"]  # the default
    (tmp_path / "later.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert models.catalog.known_family(checkpoint) is models.get(checkpoint).family is FAMILIES["sd2"]
    assert models.get(checkpoint).scheduler_config["prediction_type"] == "epsilon"
    folder = tmp_path / "folder"
    sources["sd2"].save_pretrained(folder)
    assert models.catalog.known_family(str(folder)) is models.get(str(folder)).family is FAMILIES["sd2"]
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    assert models.catalog.known_family(str(folder)) is models.get(str(folder)).family is FAMILIES["sd2-v"]
    assert models.get(str(folder)).scheduler_config["prediction_type"] == "v_prediction"


def test_sd2_v_draws_what_a_bare_v_prediction_call_draws_and_the_request_can_override_it(tiny_engine, tiny_files):
    _, _, sources = tiny_files
    pipe = sources["sd2"]
    config = dict(pipe.scheduler.config)
    served_v = pixels(answer(tiny_engine, model="sd2-v")["img"])
    assert np.array_equal(served_v, bare_call(pipe, {**config, "prediction_type": "v_prediction"}, width=64, height=64))
    served_eps = pixels(answer(tiny_engine, model="sd2-v", prediction="epsilon")["img"])
    assert np.array_equal(served_eps, bare_call(pipe, {**config, "prediction_type": "epsilon"}, width=64, height=64))
    assert not np.array_equal(served_v, served_eps)


def test_sd2_768_v_defaults_to_768_and_sd2_512_to_512(tiny_engine):
    assert decode_png(answer(tiny_engine, model="sd2-v", width=None, height=None, num_steps=1)["img"]).size == (
        768,
        768,
    )
    assert decode_png(answer(tiny_engine, model="sd2-eps", width=None, height=None, num_steps=1)["img"]).size == (
        512,
        512,
    )


def test_an_unknown_prediction_is_refused_naming_the_field(tiny_engine):
    client = imagine.create_app(tiny_engine).test_client()
    response = client.post("/generate", json={"prompt": "x", "prediction": "v-prediction"})
    assert response.status_code == 400
    assert response.get_json()["error"] == "prediction must be 'epsilon' or 'v', not 'v-prediction'"


# ---- the detector on the key sets of real checkpoints


@pytest.fixture(scope="module")
def real_key_sets():
    """Names and shapes (meta device, no weights) of real checkpoints of each family, from the shipped configs."""
    sets = {family: ldm_shapes(CONFIGS_DIR / family, family) for family in ("sd1", "sd2", "sdxl")}
    # What real files hold beyond the modules diffusers keeps: SD2 ships OpenCLIP's 24th layer (unused:
    # SD2 conditions on the penultimate one) and its projection; all carry CLIP's logit scale or ids.
    sets["sd2"] |= {
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    }
    sets["sd1"]["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    sets["sdxl"]["conditioner.embedders.1.model.logit_scale"] = ()
    return sets


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_detector_names_each_family_from_the_key_set_of_a_real_checkpoint(real_key_sets, family):
    assert detect_family(real_key_sets[family]) == family


@pytest.mark.parametrize(
    "family, key, shape",
    [
        ("sd1", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
        ("sd2", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024)),
        ("sd2", "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320)),
        ("sd2", "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", (3072, 1024)),
        ("sd2", "cond_stage_model.model.token_embedding.weight", (49408, 1024)),
        ("sdxl", "model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
        ("sdxl", "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
        ("sdxl", "model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        ("sdxl", "model.diffusion_model.output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
        ("sdxl", "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
        ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
        ("sdxl", "conditioner.embedders.1.model.text_projection", (1280, 1280)),
    ],
)
def test_the_shipped_configs_give_the_tensor_names_and_shapes_of_real_checkpoints(real_key_sets, family, key, shape):
    assert real_key_sets[family][key] == shape


def test_no_family_key_set_holds_another_familys_text_encoder(real_key_sets):
    prefixes = dict(FAMILY_KEY_PREFIXES)
    for family, keys in real_key_sets.items():
        for other, prefix in prefixes.items():
            assert any(key.startswith(prefix) for key in keys) == (other == family), (family, other)


def test_an_sdxl_refiner_is_refused_as_unrecognised(tiny_engine, tiny_files):
    models, _, _ = tiny_files
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(4)}, models / "refiner.safetensors")
    client = imagine.create_app(tiny_engine).test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "refiner"})
    assert response.status_code == 400
    assert "not a Stable Diffusion model this server recognises" in response.get_json()["error"]


@pytest.mark.parametrize("name, family, size", [("sd2", "sd2", 512), ("sd2-v", "sd2-v", 768)])
def test_an_sd2_diffusers_folder_is_recognised_as_its_kind_of_sd2(
    tiny_files, tmp_path, make_engine, name, family, size
):
    _, configs, sources = tiny_files
    scheduler = PNDMScheduler.from_pretrained(configs / name / "scheduler")
    StableDiffusionPipeline(**{**sources["sd2"].components, "scheduler": scheduler}).save_pretrained(
        tmp_path / "folder"
    )
    engine = make_engine(model="folder", models_dir=tmp_path)
    assert decode_png(answer(engine, width=None, height=None, num_steps=1)["img"]).size == (size, size)
    assert engine.models.get(engine.catalog.resolve(None)).family is FAMILIES[family]
