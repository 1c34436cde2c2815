"""The model families (the family table) and how a file or folder shows which one it is."""

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from safetensors import safe_open

from engine.errors import ImagineError
from engine.folders import read_regular_file


@dataclasses.dataclass(frozen=True)
class Family:
    """What Imagine knows of one model family: the one place that names its pipelines, configs and defaults."""

    name: str  # its id, as /models lists it
    group: str  # what a LoRA or an embedding must have been trained for: sd1, sd2 or sdxl
    label: str
    config: str  # folder under configs/ holding the model_index, module configs and tokenizer
    txt2img: type
    img2img: type
    inpaint: type
    latent_rgb: tuple  # 4x3 factors mapping latent channels to RGB, for cheap previews
    default_size: int = 512  # width and height when a request gives neither: what the family was trained at
    # 9 for inpainting checkpoints: their UNet also sees the mask and the masked picture, so every mode
    # (txt2img, img2img, inpaint) runs through their inpaint pipeline.
    unet_channels: int = 4


# ComfyUI's latent_rgb_factors for the SD1/SD2 VAE (comfy/latent_formats.py, SD15).
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

# SDXL's VAE has its own latent space: ComfyUI's factors for it (comfy/latent_formats.py, SDXL), bias left out.
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)

SD = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
      "inpaint": StableDiffusionInpaintPipeline, "latent_rgb": SD_LATENT_RGB}  # fmt: skip
SDXL = {"txt2img": StableDiffusionXLPipeline, "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline, "latent_rgb": SDXL_LATENT_RGB, "default_size": 1024}  # fmt: skip
# An inpainting checkpoint draws every mode through the inpaint pipeline.
SD_INPAINT = {**SD, "txt2img": StableDiffusionInpaintPipeline, "img2img": StableDiffusionInpaintPipeline}
SDXL_INPAINT = {**SDXL, "txt2img": StableDiffusionXLInpaintPipeline, "img2img": StableDiffusionXLInpaintPipeline}


def make_family(name: str, group: str, label: str, **fields) -> Family:
    return Family(name=name, group=group, label=label, config=name, **fields)


FAMILIES = {
    "sd1": make_family("sd1", "sd1", "Stable Diffusion 1.x", **SD),
    # SD2.x comes in two kinds the weights cannot tell apart: 512 (predicts the noise, "epsilon") and
    # 768 (predicts "v"). They differ only in their configs; see sd2_family() for which one a file gets.
    "sd2": make_family("sd2", "sd2", "Stable Diffusion 2.x (512, epsilon)", **SD),
    "sd2-v": make_family("sd2-v", "sd2", "Stable Diffusion 2.x (768, v-prediction)", **SD, default_size=768),
    "sdxl": make_family("sdxl", "sdxl", "SDXL", **SDXL),
    # Inpainting checkpoints (a 9-channel UNet input): SD1.5-inpainting, SD2-inpainting (512, epsilon), SDXL-inpainting.
    "sd1-inpaint": make_family("sd1-inpaint", "sd1", "Stable Diffusion 1.x inpainting", **SD_INPAINT, unet_channels=9),
    "sd2-inpaint": make_family(
        "sd2-inpaint", "sd2", "Stable Diffusion 2.x inpainting (512, epsilon)", **SD_INPAINT, unet_channels=9
    ),
    "sdxl-inpaint": make_family("sdxl-inpaint", "sdxl", "SDXL inpainting", **SDXL_INPAINT, unet_channels=9),
}
INPAINT_FAMILIES = {"sd1": "sd1-inpaint", "sd2": "sd2-inpaint", "sd2-v": "sd2-inpaint", "sdxl": "sdxl-inpaint"}


UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"  # its second dimension: the UNet's input channels


# What identifies each family in an original (LDM) checkpoint: the text encoder's key prefix.
# Checked in this order, since an SDXL file also has keys that look like the others'.
FAMILY_KEY_PREFIXES = (
    ("sdxl", "conditioner.embedders.1.model."),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
)


def detect_family(keys) -> str:
    """Names the model family of an LDM-layout checkpoint from its tensor names."""
    keys = list(keys)
    for family, prefix in FAMILY_KEY_PREFIXES:
        if any(key.startswith(prefix) for key in keys):
            return family
    raise ImagineError("the checkpoint is not a Stable Diffusion model this server recognises")


def refuse_pickles_that_could_run(path: Path) -> None:
    """A .ckpt is a pickle; only torch.load(weights_only=True) keeps it from running code, so where that
    guard is switched off (an environment variable) or known to leak (torch < 2.6, CVE-2025-32434), refuse."""
    if path.suffix != ".ckpt":
        return
    forced = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").lower() not in ("", "0", "n", "no", "false")
    if forced:
        raise ImagineError(".ckpt models are refused while TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; use .safetensors")
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
        raise ImagineError(".ckpt models need torch 2.6 or newer to load safely; use .safetensors or upgrade torch")


def read_checkpoint_keys(path: Path) -> list:
    """Tensor names of a checkpoint without loading its tensors (a .ckpt is memory-mapped, never unpickled unsafely)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return list(state.get("state_dict", state).keys())


def unet_input_channels(path: Path) -> int:
    """The UNet's input channels from the checkpoint's header: 4, or 9 for an inpainting model."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            keys = f.keys()
            return f.get_slice(UNET_CONV_IN).get_shape()[1] if UNET_CONV_IN in keys else 4
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    weight = state.get("state_dict", state).get(UNET_CONV_IN)
    return 4 if weight is None else weight.shape[1]


def pipeline_class_name(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names, or None where it names none readably."""
    try:
        index = json.loads(read_regular_file(folder / "model_index.json"))
    except (OSError, ValueError, RecursionError):  # missing, not JSON, not UTF-8
        return None
    return index.get("_class_name") if isinstance(index, dict) else None


PIPELINE_BASES = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionInpaintPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}


def folder_family(path: Path) -> Family:
    """The family of a diffusers folder: its pipeline class, then the text encoder, scheduler and UNet configs."""
    base = PIPELINE_BASES.get(pipeline_class_name(path))
    if base is None:
        raise ImagineError("the model folder is not a Stable Diffusion pipeline this server can load")
    family = folder_sd2_family(path) or FAMILIES[base]
    try:
        channels = json.loads(read_regular_file(path / "unet" / "config.json")).get("in_channels", 4)
    except (OSError, ValueError, AttributeError):
        channels = 4  # diffusers itself will say what is missing
    return FAMILIES[INPAINT_FAMILIES[family.name]] if channels == 9 else family


def sd2_family(path: Path) -> Family:
    """SD2 512 (epsilon) or 768 (v-prediction), from the best evidence there is: the LDM config
    that other tools read from beside the checkpoint (`name.yaml`, whose `parameterization: "v"`
    marks a v model); without one, the 768 v-prediction model, the flagship of SD 2.0 and 2.1.
    A request's `prediction` field overrides this for that request."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        v = re.search(r"""^\s*parameterization:\s*["']?v["']?\s*$""", yaml.read_text(errors="replace"), re.M)
        return FAMILIES["sd2-v" if v else "sd2"]
    return FAMILIES["sd2-v"]


def folder_sd2_family(path: Path) -> Family | None:
    """An SD2 diffusers folder shares SD1's pipeline class; its OpenCLIP text encoder (gelu, where
    OpenAI's CLIP uses quick_gelu) and its scheduler's prediction type tell which SD2 it is."""
    try:
        text_encoder = json.loads(read_regular_file(path / "text_encoder" / "config.json"))
        scheduler = json.loads(read_regular_file(path / "scheduler" / "scheduler_config.json"))
    except (OSError, ValueError):
        return None  # diffusers itself will say what is missing
    if not (isinstance(text_encoder, dict) and isinstance(scheduler, dict)):
        return None
    if text_encoder.get("hidden_act") != "gelu":
        return None
    return FAMILIES["sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"]
