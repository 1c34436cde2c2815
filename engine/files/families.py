"""The model families (the family table) and how a file or folder shows which one it is."""

import dataclasses
import os
import re
from pathlib import Path

import torch
from diffusers import (
    Flux2KleinInpaintPipeline,
    Flux2KleinPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
)
from safetensors import safe_open

from engine.errors import ImagineError
from engine.files.folders import read_regular_file, read_small_json
from engine.files.tensors import check_config_numbers


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
    latent_rgb_bias: tuple = (0.0, 0.0, 0.0)
    # What a request that gives no steps, guidance or sampler gets: the settings the family draws well with.
    default_steps: int = 25
    default_guidance: float = 7.0
    default_sampler: str = "dpm++ 2m"
    # What `guidance` sets: "cfg" (classifier-free guidance, the negative prompt's weight), "distilled" (FLUX.1-dev's
    # guidance embedding: no negative prompt) or "none" (distilled to draw without it).
    guidance: str = "cfg"
    max_guidance: float = 30.0
    size_multiple: int = 8  # the latents are 1/8 of the picture; FLUX and Z-Image pack them 2x2 as well: 16
    samplers: tuple = ()  # the samplers it can draw with; () for every SD sampler (engine/samplers.py)
    # The flow-matching families: the diffusion model's type (engine/files/diffusion_models.py; None for an SD
    # UNet), and the parts a file of it alone lacks, as (pipeline component, part type), found beside it
    # (engine/files/parts.py).
    transformer: str | None = None
    parts: tuple = ()
    prompt_tokens: int = 77  # the longest prompt the text encoder reads at once (SD reads longer ones in chunks)

    @property
    def flow(self) -> bool:
        return self.transformer is not None


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


# ComfyUI's latent_rgb_factors and bias for FLUX.1's VAE (`ae`), which Z-Image uses too (comfy/latent_formats.py,
# Flux), for latents as the transformer sees them (shifted and scaled).
FLUX1_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)  # fmt: skip
FLUX_LATENT_BIAS = (-0.0329, -0.0718, -0.0851)

# ComfyUI's factors for FLUX.2's VAE (comfy/latent_formats.py, Flux2): one row per channel of its 32-channel latents,
# which the transformer sees patchified 2x2 into 128 channels (engine/flow.py unpacks them first).
FLUX2_LATENT_RGB = (
    (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644), (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160), (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666), (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080), (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127), (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142), (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025), (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609), (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
)  # fmt: skip

# The flow-matching samplers (engine/flow.py): diffusers' FlowMatchEulerDiscreteScheduler, plain and stochastic, and
# DPM-Solver++(2M) on its schedule.
FLOW_SAMPLERS = ("euler", "euler a", "dpm++ 2m")
FLOW = {"default_size": 1024, "default_sampler": "euler", "samplers": FLOW_SAMPLERS, "size_multiple": 16,
        "prompt_tokens": 512}  # fmt: skip
Z_IMAGE = {"txt2img": ZImagePipeline, "img2img": ZImageImg2ImgPipeline, "inpaint": ZImageInpaintPipeline,
           "latent_rgb": FLUX1_LATENT_RGB, "latent_rgb_bias": FLUX_LATENT_BIAS, "transformer": "z-image",
           "parts": (("text_encoder", "qwen3"), ("vae", "ae"))}  # fmt: skip
# klein has no img2img pipeline of its own: its inpaint pipeline with the whole picture masked is one.
FLUX2_KLEIN = {"txt2img": Flux2KleinPipeline, "img2img": Flux2KleinInpaintPipeline,
               "inpaint": Flux2KleinInpaintPipeline, "latent_rgb": FLUX2_LATENT_RGB,
               "latent_rgb_bias": FLUX_LATENT_BIAS, "transformer": "flux2",
               "parts": (("text_encoder", "qwen3"), ("vae", "flux2-vae"))}  # fmt: skip
FLUX1 = {"txt2img": FluxPipeline, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline,
         "latent_rgb": FLUX1_LATENT_RGB, "latent_rgb_bias": FLUX_LATENT_BIAS, "transformer": "flux1",
         "parts": (("text_encoder", "clip-l"), ("text_encoder_2", "t5-xxl"), ("vae", "ae"))}  # fmt: skip


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
    # The flow-matching families, with the steps and guidance their model cards give. Z-Image-Turbo is distilled
    # for 8 steps without guidance (its CFG works but doubles the cost); FLUX.2 klein and FLUX.1-schnell for 4
    # steps without; FLUX.1-dev takes 28 steps and a distilled guidance of 3.5, embedded, not classifier-free.
    "z-image": make_family(
        "z-image", "z-image", "Z-Image", **Z_IMAGE, **FLOW, default_steps=8, default_guidance=0.0, max_guidance=10.0
    ),
    "flux2-klein": make_family(
        "flux2-klein",
        "flux2",
        "FLUX.2 klein",
        **FLUX2_KLEIN,
        **FLOW,
        default_steps=4,
        default_guidance=1.0,
        guidance="none",
    ),  # fmt: skip
    "flux1-dev": make_family(
        "flux1-dev",
        "flux1",
        "FLUX.1-dev",
        **FLUX1,
        **FLOW,
        default_steps=28,
        default_guidance=3.5,
        guidance="distilled",
        max_guidance=10.0,
    ),  # fmt: skip
    "flux1-schnell": make_family(
        "flux1-schnell",
        "flux1",
        "FLUX.1-schnell",
        **FLUX1,
        **FLOW,
        default_steps=4,
        default_guidance=0.0,
        guidance="none",
    ),  # fmt: skip
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


def checkpoint_family(path: Path, header: dict | None) -> Family:
    """The family of an SD checkpoint (the original LDM layout), from its tensor names and its UNet's input channels
    (`header`: its .safetensors header, None where there is none to read: see checkpoint_contents)."""
    try:
        keys, channels = checkpoint_contents(path, header)
    except Exception as error:  # a truncated download, or a .ckpt holding more than tensors: a damaged file
        raise ImagineError(f"the model file cannot be read as a checkpoint ({type(error).__name__})", 422) from error
    name = detect_family(keys)
    family = sd2_family(path) if name == "sd2" else FAMILIES[name]
    return FAMILIES[INPAINT_FAMILIES[family.name]] if channels == 9 else family


def checkpoint_contents(path: Path, header: dict | None) -> tuple:
    """(tensor names, the UNet's input channels: 4, or 9 for an inpainting model) of a checkpoint, no tensor loaded:
    from its .safetensors header; a .ckpt memory-mapped, never unpickled unsafely; a .safetensors file whose header
    could not be read opened by safetensors, whose error then names the damage."""
    if header is not None:
        conv_in = header.get(UNET_CONV_IN)
        return list(header), 4 if conv_in is None else conv_in.shape[1]
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            return keys, file.get_slice(UNET_CONV_IN).get_shape()[1] if UNET_CONV_IN in keys else 4
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("state_dict", state)
    conv_in = state.get(UNET_CONV_IN)
    return list(state.keys()), 4 if conv_in is None else conv_in.shape[1]


FOLDER_FAMILY_FILES = (  # what folder_family reads
    "model_index.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "transformer/config.json",
)


def family_deciding_files(path: Path) -> list[Path]:
    """The files whose contents decide a model's family, or its refusal: a diffusers folder's index and configs (its
    models' too: check_folder_configs), or a checkpoint and the SD2 `.yaml` that may lie beside it (sd2_family)."""
    if path.is_dir():
        return [path / name for name in FOLDER_FAMILY_FILES] + sorted(path.glob("*/config.json"))
    return [path, path.with_suffix(".yaml")]


def pipeline_class_name(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names, or None where it names none readably."""
    try:
        index = read_small_json(folder / "model_index.json")
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        return None
    return index.get("_class_name") if isinstance(index, dict) else None


PIPELINE_BASES = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionInpaintPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "ZImagePipeline": "z-image",
    "Flux2KleinPipeline": "flux2-klein",
    "FluxPipeline": "flux1-dev",
}


def flow_family_name(part) -> str:
    """The family of a diffusion model found in a file (engine/files/diffusion_models.py): FLUX.1-dev has a guidance
    embedding, schnell has none."""
    if part.type == "flux1":
        return "flux1-dev" if part.numbers["guidance"] else "flux1-schnell"
    return {"flux2": "flux2-klein", "z-image": "z-image"}[part.type]


def folder_family(path: Path) -> Family:
    """The family of a diffusers folder: its pipeline class, then the text encoder, scheduler and UNet configs."""
    base = PIPELINE_BASES.get(pipeline_class_name(path))
    if base is None:
        raise ImagineError("the model folder is not a Stable Diffusion pipeline this server can load")
    check_folder_configs(path)
    if FAMILIES[base].flow:
        return folder_flow_family(path, FAMILIES[base])
    family = folder_sd2_family(path) or FAMILIES[base]
    try:
        channels = read_small_json(path / "unet" / "config.json").get("in_channels", 4)
    except (OSError, ValueError, AttributeError):
        channels = 4  # diffusers itself will say what is missing
    return FAMILIES[INPAINT_FAMILIES[family.name]] if channels == 9 else family


def check_folder_configs(path: Path) -> None:
    """Refuses (422) a diffusers folder whose models' configs (`<part>/config.json`) are unreadable or would build a
    model beyond check_config_numbers' bounds: diffusers builds what a config says before it reads a weight, and a
    text encoder of 10^9 layers never finished building (issue 35)."""
    for config in sorted(path.glob("*/config.json")):
        where = f"{config.parent.name}/config.json"
        try:
            check_config_numbers(read_small_json(config), where)
        except OSError as error:
            raise ImagineError(f"the model folder's {where} cannot be read ({error.strerror})", 422) from None
        except ValueError as error:
            raise ImagineError(f"the model folder's {where} is not readable JSON ({error})", 422) from None


# The line of an LDM config (`.yaml`) that marks a v-prediction model, matched a line at a time: one pattern over the
# whole text, whose leading \s* also spans newlines, took quadratic time on a file of blank lines (issue 35).
V_PARAMETERIZATION = re.compile(r"""\s*parameterization:\s*["']?v["']?\s*""")


def sd2_family(path: Path) -> Family:
    """SD2 512 (epsilon) or 768 (v-prediction), from the best evidence there is: the LDM config
    that other tools read from beside the checkpoint (`name.yaml`, whose `parameterization: "v"`
    marks a v model; its first SMALL_FILE_BYTES are read, Stability's is 2 KB); without one, the 768 v-prediction
    model, the flagship of SD 2.0 and 2.1. A request's `prediction` field overrides this for that request."""
    yaml = path.with_suffix(".yaml")
    try:
        text = read_regular_file(yaml).decode(errors="replace")
    except OSError:  # none there (or a FIFO, a folder: none to read)
        return FAMILIES["sd2-v"]
    v = any(V_PARAMETERIZATION.fullmatch(line) for line in text.splitlines())
    return FAMILIES["sd2-v" if v else "sd2"]


def folder_sd2_family(path: Path) -> Family | None:
    """An SD2 diffusers folder shares SD1's pipeline class; its OpenCLIP text encoder (gelu, where
    OpenAI's CLIP uses quick_gelu) and its scheduler's prediction type tell which SD2 it is."""
    try:
        text_encoder = read_small_json(path / "text_encoder" / "config.json")
        scheduler = read_small_json(path / "scheduler" / "scheduler_config.json")
    except (OSError, ValueError):
        return None  # diffusers itself will say what is missing
    if not (isinstance(text_encoder, dict) and isinstance(scheduler, dict)):
        return None
    if text_encoder.get("hidden_act") != "gelu":
        return None
    return FAMILIES["sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"]


def folder_flow_family(path: Path, family: Family) -> Family:
    """A FLUX.1 diffusers folder is schnell where its transformer has no guidance embedding."""
    if family.name != "flux1-dev":
        return family
    try:
        transformer = read_small_json(path / "transformer" / "config.json")
    except (OSError, ValueError):
        return family  # diffusers itself will say what is missing
    guidance = transformer.get("guidance_embeds", True) if isinstance(transformer, dict) else True
    return family if guidance else FAMILIES["flux1-schnell"]
