"""Tiny flow models (Z-Image, FLUX.2 klein, FLUX.1) as a ComfyUI models folder holds them: split diffusion models,
text encoders and VAEs, all-in-one checkpoints and fp8 files; and the small request the flow tests draw them with."""

from pathlib import Path

import torch
from diffusion_model_files import flux1_tensors, flux2_tensors, is_matrix, z_image_tensors
from encoder_files import QWEN3_WIDER, ae_tensors, clip_l_tensors, flux2_vae_tensors, qwen3_tensors, t5_tensors
from safetensors.torch import save_file

SMALL = {"width": 64, "height": 64, "seed": 7}  # what a flow test draws at unless it says otherwise
# The split diffusion models of the folder, each with its family.
SPLIT_MODELS = {"z_image_turbo_bf16": "z-image", "flux-2-klein-4b": "flux2-klein", "flux-2-klein-9b": "flux2-klein",
                "flux1-schnell": "flux1-schnell", "flux1-dev": "flux1-dev"}  # fmt: skip


def save(path: Path, tensors: dict, prefix: str = "") -> Path:
    """Writes `tensors` as a .safetensors file, each name after `prefix`, making its folder where needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return path


def fp8(tensors: dict) -> dict:
    """As ComfyUI's fp8 files are: the weight matrices in float8_e4m3fn, the norms, biases and pad tokens as they
    were."""
    return {name: t.to(torch.float8_e4m3fn) if is_matrix(name, t) else t for name, t in tensors.items()}


def write_comfyui_folder(models: Path) -> None:
    """ComfyUI's models folder: diffusion models alone, their text encoders and VAEs, and an all-in-one checkpoint."""
    save(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", z_image_tensors())
    save(models / "diffusion_models" / "flux-2-klein-4b.safetensors", flux2_tensors())
    save(models / "diffusion_models" / "flux-2-klein-9b.safetensors", flux2_tensors(size="flux2-klein/transformer-9b"))
    save(models / "unet" / "flux1-schnell.safetensors", flux1_tensors(guidance=False))
    save(models / "diffusion_models" / "flux1-dev.safetensors", flux1_tensors(guidance=True))
    save(models / "diffusion_models" / "flux1-dev-fp8-e4m3fn.safetensors", fp8(flux1_tensors(guidance=True)))
    save(models / "diffusion_models" / "flux-2-klein-4b-fp8.safetensors", fp8(flux2_tensors()))
    save(models / "diffusion_models" / "z_image_turbo_fp8_e4m3fn.safetensors", fp8(z_image_tensors()))
    save(models / "text_encoders" / "qwen_3_4b.safetensors", qwen3_tensors())
    save(models / "text_encoders" / "qwen_3_8b.safetensors", qwen3_tensors(numbers=QWEN3_WIDER))  # klein 9B's
    save(models / "text_encoders" / "clip_l.safetensors", clip_l_tensors())
    save(models / "clip" / "t5xxl_fp16.safetensors", t5_tensors())
    save(models / "vae" / "ae.safetensors", ae_tensors())
    save(models / "vae" / "flux2-vae.safetensors", flux2_vae_tensors())
    all_in_one = {
        **{"model.diffusion_model." + k: v for k, v in flux1_tensors(guidance=True).items()},
        **{"text_encoders.clip_l.transformer." + k: v for k, v in clip_l_tensors().items()},
        **{"text_encoders.t5xxl.transformer." + k: v for k, v in t5_tensors().items()},
        **{"vae." + k: v for k, v in ae_tensors().items()},
    }
    save(models / "checkpoints" / "flux1-dev-all-in-one.safetensors", all_in_one)
    z_image_all_in_one = {
        **{"model.diffusion_model." + k: v for k, v in z_image_tensors().items()},
        **{"text_encoders.qwen3_4b.transformer." + k: v for k, v in qwen3_tensors().items()},
        **{"vae." + k: v for k, v in ae_tensors().items()},
    }
    save(models / "checkpoints" / "z-image-all-in-one.safetensors", z_image_all_in_one)
    klein_all_in_one = {
        **{"model.diffusion_model." + k: v for k, v in flux2_tensors().items()},
        **{"text_encoders.qwen3_4b.transformer." + k: v for k, v in qwen3_tensors().items()},
        **{"vae." + k: v for k, v in flux2_vae_tensors().items()},
    }
    save(models / "checkpoints" / "flux-2-klein-all-in-one.safetensors", klein_all_in_one)


def generate(client, **body) -> dict:
    """The answer of /generate to a request of SMALL size with `body`; fails the test on any error."""
    response = client.post("/generate", json={"prompt": "a lighthouse at dusk", **SMALL, **body})
    assert response.status_code == 200, response.get_json()
    return response.get_json()
