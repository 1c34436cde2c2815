"""LoRAs for Z-Image, FLUX.2 klein and FLUX.1, in the layouts people share (diffusers/ai-toolkit, kohya, ComfyUI/BFL),
written by the tests for the tiny flow models of flow_models: applied per request on bf16, fp8 and GGUF models, refused
naming the file where they are for another family or do not fit, and listed with their family."""

import numpy as np
import pytest
import torch
from conftest import decode_png, pixels
from diffusion_model_files import TINY_CONFIGS, flux1_tensors, flux2_tensors, z_image_tensors
from flow_models import SMALL
from gguf_model_files import Q, write_gguf
from lora_files import flow_lora, kohya_lora, z_image_fused
from safetensors.torch import save_file

from engine.demo import build_demo_pipeline
from engine.infotext import infotext_strings
from engine.settings import CONFIGS_DIR

pytestmark = pytest.mark.usefixtures("offline")

LAYOUTS = ("diffusers", "kohya", "comfyui")
# kohya's metadata as musubi-tuner (modelspec) and sd-scripts write it for LoRAs of each family.
METADATA = {
    "musubi-z-image": {"modelspec.architecture": "Z-Image/lora"},
    "musubi-klein": {"modelspec.architecture": "Flux.2-klein-4b/lora"},
    "sd-scripts-flux1": {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"},
}
MODELS = {"z-image": "z_image_turbo_bf16", "flux2-klein": "flux-2-klein-4b", "flux1-dev": "flux1-dev"}
# Each family's fp8 model (weights kept in fp8, computed in the model's dtype), with a LoRA of one layout each.
FP8_CASES = [
    ("z_image_turbo_fp8_e4m3fn", "z-image-kohya"),
    ("flux-2-klein-4b-fp8", "flux2-klein-comfyui"),
    ("flux1-dev-fp8-e4m3fn", "flux1-dev-diffusers"),
]
# Each family's GGUF model (weights kept quantized, dequantized layer by layer), with a LoRA of one layout each.
GGUF_MODELS = {
    "z-image-q8_0": (z_image_tensors, "z-image", Q.Q8_0),
    "flux-2-klein-4b-q4_0": (flux2_tensors, "flux2", Q.Q4_0),
    "flux1-dev-q8_0": (flux1_tensors, "flux1", Q.Q8_0),
}
GGUF_CASES = [
    ("z-image-q8_0", "z-image-diffusers"),
    ("flux-2-klein-4b-q4_0", "flux2-klein-kohya"),
    ("flux1-dev-q8_0", "flux1-dev-comfyui"),
]


@pytest.fixture(scope="module")
def loras(comfyui):
    """The ComfyUI folder's GGUF models (GGUF_MODELS), and its loras/: for each family a LoRA in each layout
    (<family>-<layout>), a second klein one, a Z-Image one with fused qkv layers and the same LoRA split, one shaped
    for klein 9B, one whose ranks do not match, a Z-Image one with a layer the model does not have, SD 1.5's with and
    without kohya's metadata, and files whose metadata alone says their family (METADATA)."""
    for name, (tensors, family, kind) in GGUF_MODELS.items():
        write_gguf(comfyui / "diffusion_models" / f"{name}.gguf", tensors(), family, kind)
    folder = comfyui / "loras"
    folder.mkdir()
    for family in MODELS:
        for layout in LAYOUTS:
            save_file(flow_lora(TINY_CONFIGS[family], layout), folder / f"{family}-{layout}.safetensors")
    save_file(flow_lora(TINY_CONFIGS["flux2-klein"], "comfyui", seed=1), folder / "klein-second.safetensors")
    fused, split = z_image_fused(flow_lora(TINY_CONFIGS["z-image"], "comfyui", seed=2))
    save_file(fused, folder / "z-image-fused.safetensors")
    save_file(split, folder / "z-image-split.safetensors")
    save_file(flow_lora(TINY_CONFIGS["flux2-klein/transformer-9b"], "comfyui"), folder / "klein-9b.safetensors")
    ranks = flow_lora(TINY_CONFIGS["flux2-klein"], "diffusers")
    first = next(name for name in ranks if name.endswith("lora_B.weight"))
    ranks[first] = ranks[first][:, :2].contiguous()  # lora_A has rank 4, lora_B rank 2
    save_file(ranks, folder / "klein-ranks.safetensors")
    extra = flow_lora(TINY_CONFIGS["z-image"], "diffusers")
    extra |= {f"transformer.layers.0.attention.to_z.lora_{x}.weight": torch.ones(4, 4) for x in "AB"}
    save_file(extra, folder / "z-image-extra.safetensors")
    for name, metadata in METADATA.items():
        save_file({"x.lora_down.weight": torch.zeros(1, 1)}, folder / f"{name}.safetensors", metadata=metadata)
    sd = kohya_lora(build_demo_pipeline(CONFIGS_DIR / "sd1"), text=False)
    save_file(sd, folder / "sd15.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    save_file(sd, folder / "sd-unknown.safetensors")
    return folder


@pytest.fixture(scope="module")
def client(loras, flow_client):
    return flow_client


def picture(client, model, **body):
    response = client.post("/generate", json={"prompt": "a lighthouse at dusk", **SMALL, "model": model, **body})
    assert response.status_code == 200, response.get_json()
    return pixels(response.get_json()["img"])


def differs(a, b):
    return np.abs(a - b).mean() > 0.1


def adapters(engine):
    model = next(iter(engine.models.loaded.values()))
    return {name for names in model.txt2img.get_list_adapters().values() for name in names}


@pytest.mark.parametrize(
    "model, lora",
    [(MODELS[family], f"{family}-{layout}") for family in MODELS for layout in LAYOUTS] + FP8_CASES + GGUF_CASES,
)
def test_a_lora_of_each_family_and_layout_changes_the_picture_and_the_next_request_draws_as_before(client, model, lora):
    base = picture(client, model)
    with_lora = picture(client, model, loras=[{"name": lora, "weight": 1.0}])
    assert differs(base, with_lora)
    assert np.array_equal(picture(client, model), base)
    assert np.array_equal(picture(client, model, prompt=f"<lora:{lora}:1>a lighthouse at dusk"), with_lora)


def test_a_z_image_lora_of_fused_qkv_layers_draws_what_the_same_lora_split_draws(client):
    model = MODELS["z-image"]
    fused = picture(client, model, loras=[{"name": "z-image-fused"}])
    assert differs(fused, picture(client, model, loras=[{"name": "z-image-comfyui"}]))
    assert np.array_equal(fused, picture(client, model, loras=[{"name": "z-image-split"}]))


def test_several_loras_apply_together_each_at_its_weight(client):
    model, first = MODELS["flux2-klein"], [{"name": "flux2-klein-diffusers", "weight": 0.8}]
    one = picture(client, model, loras=first)
    both = picture(client, model, loras=[*first, {"name": "klein-second", "weight": 1}])
    assert differs(one, both)
    assert differs(both, picture(client, model, loras=[*first, {"name": "klein-second", "weight": -1}]))
    assert np.array_equal(picture(client, model, loras=[*first, {"name": "klein-second", "weight": 0}]), one)


def test_the_png_keeps_the_lora_tag_and_names_each_loras_short_hash(client):
    body = {"prompt": "<lora:z-image-kohya:0.5>a lighthouse", **SMALL, "model": MODELS["z-image"]}
    response = client.post("/generate", json={**body, "loras": [{"name": "z-image-comfyui"}]})
    parameters = decode_png(response.get_json()["img"]).info["parameters"]
    assert parameters.startswith("<lora:z-image-kohya:0.5>a lighthouse\n")
    hashes = infotext_strings(parameters)["Lora hashes"].strip('"').split(", ")
    assert sorted(each.split(": ")[0] for each in hashes) == ["z-image-comfyui", "z-image-kohya"]


@pytest.mark.parametrize(
    "model, lora, error",
    [
        ("z_image_turbo_bf16", "flux1-dev-comfyui", "lora 'flux1-dev-comfyui' is for FLUX.1; the model is Z-Image"),
        ("flux-2-klein-4b", "z-image-kohya", "lora 'z-image-kohya' is for Z-Image; the model is FLUX.2 klein"),
        ("flux1-dev", "flux2-klein-kohya", "lora 'flux2-klein-kohya' is for FLUX.2; the model is FLUX.1-dev"),
        ("flux1-dev", "sd15", "lora 'sd15' is for Stable Diffusion 1.x; the model is FLUX.1-dev"),
        ("z_image_turbo_bf16", "sd-unknown", "lora 'sd-unknown' is for Stable Diffusion 1.x/2.x; the model is Z-Image"),
    ],
)
def test_a_lora_for_another_family_is_refused_naming_both_and_nothing_is_left_loaded(
    client, flow_engine, model, lora, error
):
    base = picture(client, model)
    loaded = adapters(flow_engine)
    response = client.post("/generate", json={"prompt": "p", **SMALL, "model": model, "loras": [{"name": lora}]})
    assert (response.status_code, response.get_json()) == (422, {"error": error})
    assert adapters(flow_engine) == loaded
    assert np.array_equal(picture(client, model), base)


@pytest.mark.parametrize(
    "model, lora, reason",
    [
        ("flux-2-klein-4b", "klein-9b", "its layers have other sizes than this model's"),
        ("flux-2-klein-4b", "klein-ranks", "its layers have other sizes than this model's"),
        ("z_image_turbo_bf16", "z-image-extra", "1 of its layers is not in this model: layers.0.attention.to_z"),
    ],
)
def test_a_lora_that_does_not_fit_is_refused_naming_it_and_why_and_the_model_draws_as_before(
    client, flow_engine, model, lora, reason
):
    base = picture(client, model)
    loaded = adapters(flow_engine)
    response = client.post("/generate", json={"prompt": "p", **SMALL, "model": model, "loras": [{"name": lora}]})
    assert response.status_code == 400
    family = "Z-Image" if model.startswith("z_image") else "FLUX.2 klein"
    assert response.get_json()["error"].startswith(f"lora {lora!r} does not fit this model ({family}): {reason}")
    assert adapters(flow_engine) == loaded
    assert np.array_equal(picture(client, model), base)


def test_both_lora_lists_say_which_family_each_lora_is_for(client):
    native = {lora["name"]: lora["family"] for lora in client.get("/loras").get_json()["loras"]}
    a1111 = {lora["name"]: lora["family"] for lora in client.get("/sdapi/v1/loras").get_json()}
    assert native == a1111
    for family, group in {"z-image": "z-image", "flux2-klein": "flux2", "flux1-dev": "flux1"}.items():
        assert [native[f"{family}-{layout}"] for layout in LAYOUTS] == [group] * 3
    assert (native["klein-9b"], native["sd15"], native["sd-unknown"]) == ("flux2", "sd1", "sd")
    assert [native[name] for name in METADATA] == ["z-image", "flux2", "flux1"]
