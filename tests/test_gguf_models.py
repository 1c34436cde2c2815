"""GGUF diffusion models (Z-Image, FLUX.2 klein, FLUX.1) as city96's ComfyUI-GGUF files hold them, written with the
`gguf` package from the tiny models of the flow tests: recognised by content in diffusion_models/ and unet/, listed
with family and quant type, loaded with their weights still quantized (each quant type dequantizing as gguf-py reads
it), drawn in every mode and dialect; and the files that cannot draw (truncated, of other widths, of a quant type
diffusers cannot compute with, an LLM's, a hostile header, a GGUF text encoder) refused naming the file and what is
wrong, the server serving as before."""

import base64
import io
import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import decode_png, png_data
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor
from diffusion_model_files import (
    TINY_CONFIGS,
    flux1_tensors,
    flux2_tensors,
    original_layout,
    tiny_model_state,
    z_image_tensors,
)
from encoder_files import ae_tensors, clip_l_tensors, flux2_vae_tensors, qwen3_tensors, t5_tensors
from flow_models import SMALL, generate, save
from gguf_model_files import Q, file_values, write_gguf
from PIL import Image

import imagine
from engine.engine import Engine
from engine.files.diffusion_models import load_diffusion_model, recognise_diffusion_model
from engine.files.gguf_files import GGUFHeader, quant_name, read_gguf_header

pytestmark = pytest.mark.usefixtures("offline")

FAMILIES = {  # family: (tiny tensors, config folder, (a 256-wide weight's original name, its diffusers name))
    "flux1": (flux1_tensors, "flux1-dev", ("time_in.in_layer.weight", "time_text_embed.timestep_embedder.linear_1")),
    "flux2": (
        flux2_tensors,
        "flux2-klein",
        ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1"),
    ),
    "z-image": (z_image_tensors, "z-image", ("t_embedder.mlp.0.weight", "t_embedder.mlp.0")),
}
QUANT_TYPES = (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_1, Q.Q5_0, Q.Q4_K, Q.Q4_1, Q.Q4_0, Q.Q3_K, Q.Q2_K, Q.IQ4_XS, Q.IQ4_NL,
               Q.BF16, Q.F16)  # fmt: skip
# The GGUF models of the folder: name -> (family as listed, quant type as listed)
MODELS = {
    "z_image_turbo-Q8_0": ("z-image", "Q8_0"),
    "flux-2-klein-4b-Q4_0": ("flux2-klein", "Q4_0"),
    "flux1-schnell-Q5_0": ("flux1-schnell", "Q5_0"),
    "flux1-dev-Q8_0": ("flux1-dev", "Q8_0"),
}


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """A ComfyUI models folder of GGUF diffusion models (in diffusion_models/ and ComfyUI-GGUF's unet/), their text
    encoders and VAEs as .safetensors, and Z-Image's bf16 file beside its Q8_0 one."""
    models = tmp_path_factory.mktemp("ComfyUI") / "models"
    write_gguf(models / "diffusion_models" / "z_image_turbo-Q8_0.gguf", z_image_tensors(), "z-image", Q.Q8_0)
    write_gguf(models / "diffusion_models" / "flux-2-klein-4b-Q4_0.gguf", flux2_tensors(), "flux2", Q.Q4_0)
    write_gguf(models / "unet" / "flux1-schnell-Q5_0.gguf", flux1_tensors(guidance=False), "flux1", Q.Q5_0)
    write_gguf(models / "unet" / "flux1-dev-Q8_0.gguf", flux1_tensors(), "flux1", Q.Q8_0, "model.diffusion_model.")
    save(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", z_image_tensors())
    save(models / "text_encoders" / "qwen_3_4b.safetensors", qwen3_tensors())
    save(models / "text_encoders" / "clip_l.safetensors", clip_l_tensors())
    save(models / "text_encoders" / "t5xxl_fp16.safetensors", t5_tensors())
    save(models / "vae" / "ae.safetensors", ae_tensors())
    save(models / "vae" / "flux2-vae.safetensors", flux2_vae_tensors())
    return models


@pytest.fixture(scope="module")
def gguf_engine(gguf_models, tiny_configs):
    engine = Engine(imagine.Settings(model="demo", models_dir=gguf_models, max_loaded=1), configs_dir=tiny_configs)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def client(gguf_engine):
    return imagine.create_app(gguf_engine).test_client()


def refusal(client, model: str) -> str:
    """The error a request to draw with `model` is refused with, as a 422."""
    response = client.post("/generate", json={"prompt": "p", "model": model, **SMALL})
    assert response.status_code == 422, response.get_json()
    return response.get_json()["error"]


def listed(client) -> dict:
    return {entry["name"]: entry for entry in client.get("/models").get_json()["models"]}


# ---- loading


@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda kind: kind.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_from_a_gguf_file_with_its_weights_kept_as_the_files_blocks(
    tmp_path, tiny_configs, family, kind
):
    tensors, folder, (original, module_name) = FAMILIES[family]
    path = write_gguf(tmp_path / "model.gguf", tensors(), family, kind)
    part = recognise_diffusion_model(read_gguf_header(path))
    assert part.type == family
    model = load_diffusion_model(path, part, tiny_configs / folder, torch.bfloat16)
    layer = model.get_submodule(module_name)
    expected = file_values(path, original)
    if kind in (Q.BF16, Q.F16):  # kept as torch tensors, in the compute dtype
        assert not any(isinstance(module, GGUFLinear) for module in model.modules())
        assert torch.equal(layer.weight, expected.to(torch.bfloat16))
    else:  # kept as the file's blocks, dequantized as they compute, to what gguf-py reads from the file
        assert isinstance(layer, GGUFLinear) and layer.weight.quant_type == kind
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_shape == tuple(expected.shape)
        rounding = expected.abs().max() * 2**-10  # diffusers dequantizes in float16, gguf-py in float32
        assert torch.allclose(dequantize_gguf_tensor(layer.weight).float(), expected, rtol=0, atol=rounding)
    assert model.dtype == torch.bfloat16 and not model.training


def test_a_quantized_model_holds_its_matrices_in_the_bytes_the_file_gives_them(tmp_path, tiny_configs):
    path = write_gguf(tmp_path / "z.gguf", z_image_tensors(), "z-image", Q.Q4_0)
    header = read_gguf_header(path)
    model = load_diffusion_model(path, recognise_diffusion_model(header), tiny_configs / "z-image", torch.bfloat16)
    held = sum(m.weight.nbytes for m in model.modules() if isinstance(m, GGUFLinear))
    in_file = sum(tensor.nbytes for tensor in header.values() if tensor.dtype == "Q4_0")
    assert held == in_file
    as_bf16 = sum(math.prod(m.weight.quant_shape) * 2 for m in model.modules() if isinstance(m, GGUFLinear))
    assert held * 3.5 < as_bf16  # Q4_0: 4.5 bits a weight where bf16 takes 16


def test_the_header_gives_torch_shapes_from_the_files_reversed_dimensions(tmp_path):
    tensors = flux1_tensors()
    path = write_gguf(tmp_path / "flux.gguf", tensors, "flux1", Q.Q8_0)
    header = read_gguf_header(path)
    assert header.architecture == "flux"
    assert {name: tensor.shape for name, tensor in header.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert header["img_in.weight"].dtype == "Q8_0" and header["img_in.bias"].dtype == "F32"


@pytest.mark.parametrize(
    "file_type, weights, listed_as",
    [(14, "Q4_K", "Q4_K_S"), (8, "Q8_0", "Q8_0"), (None, "Q5_0", "Q5_0"), (1, "F16", "F16")],
    ids=["llama-quantize", "convert.py's-q8_0", "none", "f16"],
)
def test_the_quant_type_listed_is_llama_cpps_file_type_where_it_agrees_with_the_weights(file_type, weights, listed_as):
    # ComfyUI-GGUF's convert.py writes the GGML type (Q8_0 is 8) where llama.cpp's file type is meant (8 is Q5_0)
    assert quant_name(GGUFHeader({}, "flux", file_type), weights) == listed_as


# ---- the folder: listing and drawing


def test_gguf_models_in_diffusion_models_and_unet_are_listed_with_family_quant_type_and_parts(client):
    models = listed(client)
    for name, (family, quant) in MODELS.items():
        assert models[name]["family"] == family and models[name]["quant"] == quant, models[name]
        assert "missing" not in models[name]["parts"]
    assert "quant" not in models["z_image_turbo_bf16"]


@pytest.mark.parametrize("name", MODELS)
def test_each_gguf_model_draws_txt2img_img2img_and_inpainting(client, name):
    first = generate(client, model=name)
    assert generate(client, model=name)["img"] == first["img"]  # the same seed, the same picture
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    img2img = generate(client, model=name, img=png_data(start), strength=0.5)
    assert decode_png(img2img["img"]).size == (64, 64) and img2img["img"] != first["img"]
    painted = generate(client, model=name, img=png_data(start), mask=png_data(mask), mask_blur=0)
    pixels = np.asarray(decode_png(painted["img"]).convert("RGB"), int)
    assert np.abs(pixels[:8, :8] - (200, 30, 30)).max() <= 2  # outside the mask: the input's pixels


def test_a_q8_0_file_draws_nearly_the_picture_its_bf16_file_draws(client):
    quantized = np.asarray(decode_png(generate(client, model="z_image_turbo-Q8_0")["img"]), int)
    bf16 = np.asarray(decode_png(generate(client, model="z_image_turbo_bf16")["img"]), int)
    assert np.abs(quantized - bf16).mean() < 2


@pytest.mark.parametrize("name", ["z_image_turbo-Q8_0", "flux-2-klein-4b-Q4_0", "flux1-schnell-Q5_0"])
def test_a1111_and_openai_clients_draw_and_edit_with_a_gguf_model(client, name):
    titles = [entry["model_name"] for entry in client.get("/sdapi/v1/sd-models").get_json()]
    assert name in titles
    body = {"prompt": "a fox", "width": 64, "height": 64, "seed": 3, "override_settings": {"sd_model_checkpoint": name}}
    answer = client.post("/sdapi/v1/txt2img", json=body).get_json()
    again = {**body, "init_images": [answer["images"][0]], "denoising_strength": 0.5}
    redrawn = client.post("/sdapi/v1/img2img", json=again).get_json()
    assert decode_png(redrawn["images"][0]).size == (64, 64) and redrawn["images"][0] != answer["images"][0]
    body = {"prompt": "a fox", "model": name, "size": "256x256"}
    drawn = base64.b64decode(client.post("/v1/images/generations", json=body).get_json()["data"][0]["b64_json"])
    form = {**body, "image": (io.BytesIO(drawn), "fox.png")}
    edited = client.post("/v1/images/edits", data=form, content_type="multipart/form-data").get_json()
    assert Image.open(io.BytesIO(base64.b64decode(edited["data"][0]["b64_json"]))).size == (256, 256)


# ---- files that cannot draw


@pytest.fixture
def bad_file(gguf_models, client):
    """A path in diffusion_models/ for a test's bad GGUF, removed afterwards; the Q8_0 Z-Image loaded first, which
    must be there as before once the bad file is refused."""
    generate(client, model="z_image_turbo-Q8_0")
    path = gguf_models / "diffusion_models" / "bad.gguf"
    yield path
    path.unlink(missing_ok=True)
    assert listed(client)["z_image_turbo-Q8_0"]["loaded"]
    generate(client, model="z_image_turbo-Q8_0")


def test_a_truncated_gguf_is_refused_as_a_download_cut_short(client, bad_file, tmp_path):
    whole = write_gguf(tmp_path / "z.gguf", z_image_tensors(), "z-image").read_bytes()
    bad_file.write_bytes(whole[: len(whole) - 100])
    error = refusal(client, "bad")
    assert error.startswith("bad.gguf: the file is truncated") and "download" in error
    assert listed(client)["bad"]["error"] == error


def test_a_gguf_of_widths_its_family_does_not_have_is_refused_naming_the_width(client, bad_file):
    config = {**TINY_CONFIGS["flux2-klein"], "num_attention_heads": 4, "attention_head_dim": 8}  # as wide, more heads
    write_gguf(bad_file, original_layout(tiny_model_state(config, torch.bfloat16), config), "flux2")
    error = refusal(client, "bad")
    assert error.startswith("bad.gguf: the diffusion model does not fit the flux2-klein architecture")
    assert "its number of heads is 4 where the architecture's is 2" in error


def test_a_gguf_of_a_quant_type_diffusers_cannot_compute_with_is_refused_naming_it(client, bad_file):
    write_gguf(bad_file, z_image_tensors(), "z-image", Q.MXFP4)
    error = refusal(client, "bad")
    assert error.startswith("bad.gguf: the GGUF file holds") and "(MXFP4)" in error and "Q4_K" in error


def test_an_llms_gguf_in_diffusion_models_is_refused_saying_what_it_holds(client, bad_file):
    llm = {"token_embd.weight": torch.randn(64, 32), "blk.0.attn_q.weight": torch.randn(32, 32)}
    write_gguf(bad_file, llm, "z-image", architecture="qwen3")
    error = refusal(client, "bad")
    assert error.startswith("bad.gguf: the GGUF file holds a 'qwen3' model, not the diffusion model of FLUX.1")


@pytest.mark.parametrize(
    "header, why",
    [
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 0), f"{1 << 62} tensors"),  # more than any file: refused at once
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 1 << 60) + b"key", "runs past its bound"),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 1 << 40),
            f"a metadata array of {1 << 40} items",
        ),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1"),
        (b"GGUF", "4 bytes, fewer than a GGUF header's"),
        (b"GGML" + bytes(40), "it does not start as GGUF files do"),
    ],
    ids=["tensor-count", "key-length", "array-length", "version", "magic-only", "no-magic"],
)
def test_a_hostile_or_damaged_gguf_header_is_refused_before_reading_what_it_promises(client, bad_file, header, why):
    bad_file.write_bytes(header)
    error = refusal(client, "bad")
    assert error.startswith("bad.gguf: the file cannot be read as GGUF") and why in error


# ---- GGUF text encoders


def test_a_gguf_text_encoder_named_by_a_sidecar_is_refused_naming_the_safetensors_file_to_use(gguf_models, client):
    write_gguf(gguf_models / "text_encoders" / "Qwen3-4B-Q4_K_M.gguf", {"token_embd.weight": torch.randn(64, 32)},
               "z-image", architecture="qwen3")  # fmt: skip
    sidecar = gguf_models / "diffusion_models" / "z_image_turbo-Q8_0.json"
    sidecar.write_text(json.dumps({"text_encoder": "text_encoders/Qwen3-4B-Q4_K_M"}))
    try:
        error = refusal(client, "z_image_turbo-Q8_0")
        assert error == (
            "the sidecar's text_encoder 'text_encoders/Qwen3-4B-Q4_K_M' is a GGUF file; Imagine loads a Qwen3 text "
            "encoder from .safetensors only: download qwen_3_4b.safetensors (8 GB; klein 9B: "
            "qwen_3_8b_fp8mixed.safetensors) into text_encoders/ of a models folder"
        )
    finally:
        sidecar.unlink()
        (gguf_models / "text_encoders" / "Qwen3-4B-Q4_K_M.gguf").unlink()
    generate(client, model="z_image_turbo-Q8_0")
