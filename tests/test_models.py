"""Finding, loading and caching models: names, paths, single files in the LDM layout, folders, offline."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST, count_loads, pixels, png_data, save_config_folder, save_tiny_folder
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from ldm_checkpoint import ldm_state_dict, save_ldm_checkpoint
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import imagine
from engine.files.families import detect_family
from engine.ksampling import KDiffusionScheduler
from engine.noise import PictureNoise
from engine.settings import CONFIGS_DIR


@pytest.fixture
def tiny_models(tmp_path):
    """A models directory with one tiny model three ways (folder, .safetensors, .ckpt) and a config root for it."""
    models = tmp_path / "models"
    save_tiny_folder(models / "tiny", seed=1)
    pipe = StableDiffusionPipeline.from_pretrained(models / "tiny")
    save_ldm_checkpoint(pipe, models / "tiny-ldm.safetensors")
    save_ldm_checkpoint(pipe, models / "tiny-pickle.ckpt")
    configs = tmp_path / "configs"
    save_config_folder(pipe, configs / "sd1")
    return models, configs


@pytest.fixture
def tiny_engine(tiny_models, make_engine):
    models, configs = tiny_models
    # float32, as the references these tests compare with, whatever `auto` picks on this CPU
    return make_engine(model="tiny", models_dir=models, max_loaded=3, fp_prec="32", configs_dir=configs)


def picture(engine, **fields):
    response = imagine.create_app(engine).test_client().post("/generate", json={"prompt": "a cat", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return pixels(response.get_json()["img"])


@pytest.mark.parametrize("name", ["tiny-ldm", "tiny-ldm.safetensors", "tiny-pickle", "tiny-pickle.ckpt"])
def test_a_single_file_checkpoint_loads_offline_and_draws_what_its_source_folder_draws(tiny_engine, no_network, name):
    assert np.array_equal(picture(tiny_engine, model=name), picture(tiny_engine, model="tiny"))


def test_a_single_file_checkpoint_loads_with_identical_weights(tiny_engine, tiny_models, no_network):
    models, _ = tiny_models
    source = StableDiffusionPipeline.from_pretrained(models / "tiny")
    loaded = tiny_engine.models.get(tiny_engine.catalog.resolve("tiny-ldm")).txt2img
    for name in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_model_can_be_named_by_path(tiny_engine, tiny_models):
    models, _ = tiny_models
    by_path = picture(tiny_engine, model=str(models / "tiny-ldm.safetensors"))
    assert np.array_equal(by_path, picture(tiny_engine, model="tiny"))


def test_the_default_model_serves_requests_without_a_model_field(tiny_engine):
    assert np.array_equal(picture(tiny_engine), picture(tiny_engine, model="tiny"))


def test_the_servers_picture_equals_a_bare_diffusers_call(tiny_engine, tiny_models):
    models, _ = tiny_models
    pipe = StableDiffusionPipeline.from_pretrained(models / "tiny")
    # The server's dpm++ 2m: A1111's (k-diffusion's DPM++ 2M on its Karras schedule) from the seed's CPU noise.
    pipe.scheduler = KDiffusionScheduler.for_model(dict(pipe.scheduler.config), "dpm++ 2m")
    noise = PictureNoise("cpu", [42], (4, 8, 8))
    pipe.scheduler.use_noise(noise)
    bare = pipe(
        "a cat",
        negative_prompt="ugly",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=7.0,
        latents=noise.next(),
    ).images[0]
    served = picture(tiny_engine, model="tiny", neg="ugly", sampler="dpm++ 2m", seed=42)
    assert np.array_equal(served, np.asarray(bare, dtype=np.int16))


def test_a_second_request_for_a_loaded_model_loads_nothing(tiny_engine, monkeypatch):
    loads = count_loads(tiny_engine, monkeypatch)
    first = picture(tiny_engine, model="tiny")
    picture(tiny_engine, model="tiny", seed=1)
    picture(tiny_engine, model="tiny-ldm")
    picture(tiny_engine, model="tiny", img=png_data(Image.fromarray(first.astype(np.uint8))), strength=0.5)
    picture(tiny_engine, model="tiny-ldm", prompt="another")
    assert len(loads) == 2


def test_the_least_recently_used_model_is_unloaded_beyond_max_loaded(tiny_models, make_engine, monkeypatch):
    models, configs = tiny_models
    engine = make_engine(models_dir=models, max_loaded=2, configs_dir=configs)
    loads = count_loads(engine, monkeypatch)
    for name in ("tiny", "tiny-ldm", "tiny", "demo"):  # 'tiny-ldm' is now the least recently used
        picture(engine, model=name)
    assert [model.name for model in engine.models.loaded.values()] == ["tiny", "demo"]
    picture(engine, model="tiny-ldm")
    assert [key.rsplit("/", 1)[-1] for key in loads] == ["tiny", "tiny-ldm.safetensors", "demo", "tiny-ldm.safetensors"]


def test_a_model_that_cannot_load_does_not_evict_the_loaded_one(tiny_models, make_engine, monkeypatch):
    models, configs = tiny_models
    save_file({"some.other.weight": torch.zeros(4)}, models / "xl.safetensors")
    engine = make_engine(model="tiny", models_dir=models, max_loaded=1, configs_dir=configs)
    picture(engine)
    loads = count_loads(engine, monkeypatch)
    response = imagine.create_app(engine).test_client().post("/generate", json={"prompt": "x", "model": "xl"})
    assert response.status_code == 400
    picture(engine)
    assert loads == []


def test_img2img_shares_the_txt2img_weights(tiny_engine):
    model = tiny_engine.models.get(tiny_engine.catalog.resolve("tiny"))
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(model.img2img, name) is getattr(model.txt2img, name)


@pytest.mark.parametrize(
    "prefix, family",
    [
        ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "sd1"),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "sd2"),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
    ],
)
def test_the_family_is_detected_from_the_checkpoint_keys(prefix, family):
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight", prefix]
    if family == "sdxl":  # an SDXL file also carries a CLIP ViT-L under embedders.0
        keys.append("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight")
    assert detect_family(keys) == family


def tensors(*names):
    return lambda path: save_file({name: torch.zeros(4) for name in names}, path.with_suffix(".safetensors"))


@pytest.mark.parametrize(
    "write, message",
    [
        (tensors("some.other.weight"), "not a Stable Diffusion model"),
        (lambda path: path.mkdir(), "not a Stable Diffusion pipeline"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_refused_with_400_saying_why(tiny_engine, tiny_models, write, message):
    models, _ = tiny_models
    write(models / "unloadable")
    client = imagine.create_app(tiny_engine).test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "unloadable"})
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_the_code_never_runs(tiny_engine, tiny_models, tmp_path):
    models, _ = tiny_models
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, models / "evil.ckpt")
    client = imagine.create_app(tiny_engine).test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "evil"})
    assert response.status_code == 422
    assert "cannot be read as a checkpoint" in response.get_json()["error"]
    assert not marker.exists()
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200


def test_ldm_helper_writes_the_key_names_of_real_sd15_checkpoints():
    """The tests' own checkpoint writer: built on the meta device (no weights) from the shipped configs."""
    config = CONFIGS_DIR / "sd1"
    with torch.device("meta"):
        modules = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
        )
    keys = ldm_state_dict(modules)
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys
    # A real SD1.5 file has 1131: the same plus the text encoder's position_ids buffer.
    assert len(keys) == 1130
