#!/usr/bin/env python3
"""Imagine: a small local HTTP server for Stable Diffusion, in the spirit of Ollama.

`POST /generate`: JSON in, a base64 PNG out, or with `"stream": N` a line of
newline-delimited JSON every N steps while the picture forms. Models are single-file checkpoints
(`dreamshaper_8.safetensors`), `.ckpt` files (loaded without running their pickle) or diffusers
folders, all loaded with no network: the configs and the CLIP tokenizer ship in `configs/`.

    python imagine.py --model demo          # a tiny random model: proves the path, draws noise
    curl -s localhost:5000/generate -H 'Content-Type: application/json' -d '{"prompt": "a cat"}'

The file reads top to bottom: settings (parsed before the heavy libraries are imported, so that --help
answers at once), devices, models, samplers, previews, requests, generation, the engine that runs one
generation at a time, the HTTP app, and main().
"""

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import socket
import struct
import threading
import time
import warnings
from pathlib import Path

log = logging.getLogger("imagine")

# ---------------------------------------------------------------------------------------------
# Settings: every one a flag, an IMAGINE_* environment variable, and a default.
# ---------------------------------------------------------------------------------------------

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
WEB_DIR = Path(__file__).resolve().parent / "web"  # the web page: index.html, its script and style
DEMO_MODEL = "demo"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

MIN_SIZE, MAX_SIZE = 64, 2048  # pixels, each a multiple of 8 (the VAE downsamples by 8); MAX_SIZE is a setting
MAX_BODY_BYTES = 64 * 2**20  # a request body; a large input picture as base64 PNG fits
MAX_IMG_PIXELS = 4096 * 4096  # an input picture, checked from its header before it is decoded
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1  # what A1111 and most tools use, and exact in JavaScript numbers
MAX_BATCH = 8  # pictures one request may ask for (`n`); a setting
MAX_CLIP_SKIP = 12  # AUTOMATIC1111's limit; a model's own text encoder may have fewer layers
# A prompt is tokenised and stored in the PNG: 16k characters is some 200 CLIP chunks of 75 tokens,
# far beyond any prompt people write, and bounds the work (a 10 MB prompt took 80 s and 4 GB).
MAX_PROMPT_CHARS = 16_000
# What parsing a body may cost: a /generate body is one flat object with a few dozen of the marks that make
# values ([, { and ,), and two prompts full of them stay far below this. Counting them is cheap; parsing
# 63 MB of nested empty objects took 1.7 GB.
MAX_JSON_MARKS = 50_000
# Picture formats an input image may have: what cameras, browsers and editors save. Pillow knows many
# more (EPS runs Ghostscript on the data, others are rare codecs); those are refused, unread.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 5000
    device: str = "auto"
    fp_prec: str = "auto"
    model: str = DEMO_MODEL
    models_dir: Path = Path("~/.imagine/models").expanduser()  # one folder, or several joined by os.pathsep
    max_loaded: int = 1
    allow_downloads: bool = False
    compile: bool = False
    max_size: int = MAX_SIZE
    max_queue: int = 8
    max_batch: int = MAX_BATCH
    api_key: str = ""
    cors_origins: tuple = ()
    no_web: bool = False


def parse_settings(argv=None) -> Settings:
    """Reads flags, falling back to IMAGINE_* environment variables, then to the defaults."""
    defaults = Settings()

    def env(name, default):
        return os.environ.get(f"IMAGINE_{name}", default)

    parser = argparse.ArgumentParser(
        description="Imagine: a local Stable Diffusion server with one endpoint, POST /generate.",
        epilog="Each flag falls back to the environment variable shown, e.g. IMAGINE_PORT=5001.",
    )
    parser.add_argument(
        "--host",
        default=env("HOST", defaults.host),
        help=f"address to listen on (IMAGINE_HOST, default {defaults.host})",
    )
    parser.add_argument(
        "-p",
        "--port",
        type=int,
        default=env("PORT", defaults.port),
        help=f"port (IMAGINE_PORT, default {defaults.port})",
    )
    parser.add_argument(
        "-d",
        "--device",
        default=env("DEVICE", defaults.device),
        help="auto | cpu | cuda | cuda:N | mps; auto picks cuda, then mps, then cpu; cuda:1 is the second GPU "
        "(IMAGINE_DEVICE, default auto)",
    )
    parser.add_argument(
        "-f",
        "--fp_prec",
        default=env("FP_PREC", defaults.fp_prec),
        help="16 | 32 | auto: 16 on gpus and cpus with native bfloat16, else 32; bfloat16 on cpu "
        "(IMAGINE_FP_PREC, default auto)",
    )
    parser.add_argument(
        "--model",
        default=env("MODEL", defaults.model),
        help="default model: a name in the models directory, a path, or 'demo' (IMAGINE_MODEL, default demo)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=env("MODELS_DIR", defaults.models_dir),
        help=f"where named models live: one folder, or several separated by {os.pathsep!r}, searched in order "
        "(IMAGINE_MODELS_DIR, default ~/.imagine/models)",
    )
    parser.add_argument(
        "--max-loaded",
        type=int,
        default=env("MAX_LOADED", defaults.max_loaded),
        help="models kept loaded at once; the least recently used goes first (IMAGINE_MAX_LOADED, default 1)",
    )
    parser.add_argument(
        "--allow-downloads",
        action="store_true",
        default=env("ALLOW_DOWNLOADS", "").lower() in ("1", "true", "yes"),
        help="let a model named like 'owner/repo' be fetched from the Hugging Face hub (IMAGINE_ALLOW_DOWNLOADS=1; "
        "default off)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=env("COMPILE", "").lower() in ("1", "true", "yes"),
        help="torch.compile the UNet: faster steps on GPUs after minutes of compiling per new size (IMAGINE_COMPILE=1; "
        "default off)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=env("MAX_SIZE", defaults.max_size),
        help=f"largest width and height a request may ask for, a multiple of 8 (IMAGINE_MAX_SIZE, default {MAX_SIZE})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=env("MAX_QUEUE", defaults.max_queue),
        help="requests that may wait while one generates; more get 503 with Retry-After (IMAGINE_MAX_QUEUE, default 8)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=env("MAX_BATCH", defaults.max_batch),
        help=f"most pictures one request may ask for with n (IMAGINE_MAX_BATCH, default {MAX_BATCH})",
    )
    parser.add_argument(
        "--api-key",
        default=env("API_KEY", defaults.api_key),
        help="require 'Authorization: Bearer KEY' on every request (IMAGINE_API_KEY; prefer it: flags show in ps; "
        "default none)",
    )
    parser.add_argument(
        "--cors-origins",
        default=env("CORS_ORIGINS", ""),
        help="web origins allowed to call the server, comma-separated, e.g. http://localhost:3000, "
        "or * for any (IMAGINE_CORS_ORIGINS; default none)",
    )
    parser.add_argument(
        "--no-web",
        action="store_true",
        default=env("NO_WEB", "").lower() in ("1", "true", "yes"),
        help="turn the web page at / off, for a pure API server (IMAGINE_NO_WEB=1; default on)",
    )
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", args.device):
        parser.error(f"--device must be auto, cpu, cuda, cuda:N or mps, not {args.device!r}")
    if args.fp_prec not in ("auto", "16", "32"):
        parser.error(f"--fp_prec must be 16, 32 or auto, not {args.fp_prec!r}")
    if args.max_loaded < 1:
        parser.error(f"--max-loaded must be at least 1, not {args.max_loaded}")
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, not {args.max_batch}")
    if args.max_queue < 0:
        parser.error(f"--max-queue must be 0 or more, not {args.max_queue}")
    if args.max_size < MIN_SIZE or args.max_size % 8:
        parser.error(f"--max-size must be a multiple of 8 from {MIN_SIZE}, not {args.max_size}")
    origins = tuple(origin.strip().rstrip("/") for origin in args.cors_origins.split(",") if origin.strip())
    return Settings(**{**vars(args), "models_dir": Path(args.models_dir).expanduser(), "cors_origins": origins})


# ---------------------------------------------------------------------------------------------
# The libraries, imported once the settings are parsed: --help and a mistyped flag answer at once,
# not after the seconds that torch and diffusers take to import.
# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    parse_settings()  # exits here for --help or a bad flag; main() parses them again, in no time

import torch
import transformers

# Before diffusers is imported: it touches transformers' image processors, which would log that
# torchvision is missing. This server never uses them, and the notice would only confuse a user.
transformers.utils.logging.set_verbosity_error()

import diffusers  # noqa: I001 (must come after the line above)
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from flask import Flask, Response, jsonify, request, send_from_directory
from PIL import Image, ImageFilter, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from waitress.channel import HTTPChannel
from werkzeug.exceptions import HTTPException

# The libraries' notices (safety checker disabled, dtype casts, torchsde's float rounding) say
# nothing actionable to someone running a server; real errors still reach the log.
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()  # the log reports loads and generations instead
transformers.utils.logging.disable_progress_bar()  # it draws one for each LoRA's text-encoder weights
warnings.filterwarnings("ignore", message="Should have tb<=t1", module="torchsde")
# peft's notice when a second LoRA joins a model: several adapters side by side is what Imagine wants.
warnings.filterwarnings("ignore", message="Already found a `peft_config`", module="peft")


# ---------------------------------------------------------------------------------------------
# Devices and precision
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """'auto' takes the fastest device present; a named one must exist, `cuda:N` down to its GPU."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    kind, _, index = name.partition(":")
    if not available[kind]:
        raise SystemExit(f"imagine: device {name!r} is not available on this machine")
    if index and int(index) >= (count := torch.cuda.device_count()):
        gpus = f"cuda:0 to cuda:{count - 1}" if count else "none"
        raise SystemExit(f"imagine: device {name!r} is not available: this machine has {count} GPU(s) ({gpus})")
    return torch.device(name)


CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_feature() -> str | None:
    """The instructions that run bfloat16 natively on this CPU (avx512_bf16 or AMX), or None if it has neither."""
    try:
        # torch's own probe answers on every operating system.
        found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}
    except AttributeError:  # private helpers a future torch may drop; Linux still lists the flags
        flags = set(CPUINFO.read_text().split()) if CPUINFO.is_file() else set()
        found = {"avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags}
    return next((name for name, present in found.items() if present), None)


def pick_dtype(fp_prec: str, device: torch.device) -> torch.dtype:
    """16-bit means float16 on GPUs; on CPUs float16 is slow or unsupported, so bfloat16.

    'auto' takes 16-bit wherever it is fast: always on a GPU, and on a CPU that runs bfloat16
    natively (2 cores with avx512_bf16: a 512x512 step in 6.2 s against 11-12 s in float32).
    """
    if fp_prec == "auto":
        if device.type != "cpu":
            fp_prec, why = "16", f"float16 on {device.type}: half the memory and time of float32"
        elif feature := cpu_bf16_feature():
            fp_prec, why = "16", f"bfloat16: this CPU runs it natively ({feature}), about twice as fast as float32"
        else:
            fp_prec, why = "32", "float32: this CPU has no native bfloat16 (avx512_bf16 or AMX), where 16-bit is slower"
        log.info("precision auto: %s", why)
    if fp_prec == "32":
        return torch.float32
    if device.type == "cpu" and cpu_bf16_feature() is None:
        warn_bfloat16_is_emulated()
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def warn_bfloat16_is_emulated() -> None:
    """An explicit -f 16 is honoured (it halves the memory), but on such a CPU a generation can look like a hang."""
    log.warning(
        "-f 16 on a CPU without native bfloat16 (no avx512_bf16 or AMX): bfloat16 is emulated here, measured over "
        "20x slower than float32 (256x256, 4 steps, SD1.5: over 6 min against 17 s on 2 cores); -f 32 is faster"
    )


# ---------------------------------------------------------------------------------------------
# Models: resolve a name, detect the family, load offline, keep a few loaded
# ---------------------------------------------------------------------------------------------


class ImagineError(Exception):
    """A problem to tell the client about; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, for a 503: when trying again is likely to work


@dataclasses.dataclass(frozen=True)
class Family:
    label: str
    config: str  # folder under configs/ holding the model_index, module configs and tokenizer
    txt2img: type
    img2img: type
    latent_rgb: tuple  # 4x3 factors mapping latent channels to RGB, for cheap previews
    default_size: int = 512  # width and height when a request gives neither: what the family was trained at
    inpaint: type = StableDiffusionInpaintPipeline
    # 9 for inpainting checkpoints: their UNet also sees the mask and the masked picture, so every mode
    # (txt2img, img2img, inpaint) runs through their inpaint pipeline.
    unet_channels: int = 4


# ComfyUI's latent_rgb_factors for the SD1/SD2 VAE (see shared notes, diffusers-facts.md).
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

# SDXL's VAE has its own latent space (see shared notes, diffusers-facts.md); these factors leave out its bias.
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)

SD = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)
SD_INPAINT = (StableDiffusionInpaintPipeline, StableDiffusionInpaintPipeline)
SDXL_INPAINT = (StableDiffusionXLInpaintPipeline, StableDiffusionXLInpaintPipeline)
FAMILIES = {
    "sd1": Family("Stable Diffusion 1.x", "sd1", *SD, SD_LATENT_RGB),
    # SD2.x comes in two kinds the weights cannot tell apart: 512 (predicts the noise, "epsilon") and
    # 768 (predicts "v"). They differ only in their configs; see sd2_family() for which one a file gets.
    "sd2": Family("Stable Diffusion 2.x (512, epsilon)", "sd2", *SD, SD_LATENT_RGB),
    "sd2-v": Family("Stable Diffusion 2.x (768, v-prediction)", "sd2-v", *SD, SD_LATENT_RGB, default_size=768),
    "sdxl": Family(
        "SDXL",
        "sdxl",
        StableDiffusionXLPipeline,
        StableDiffusionXLImg2ImgPipeline,
        SDXL_LATENT_RGB,
        default_size=1024,
        inpaint=StableDiffusionXLInpaintPipeline,
    ),
    # Inpainting checkpoints (a 9-channel UNet input): SD1.5-inpainting, SD2-inpainting (512, epsilon), SDXL-inpainting.
    "sd1-inpaint": Family(
        "Stable Diffusion 1.x inpainting", "sd1-inpaint", *SD_INPAINT, SD_LATENT_RGB, unet_channels=9
    ),
    "sd2-inpaint": Family(
        "Stable Diffusion 2.x inpainting (512, epsilon)", "sd2-inpaint", *SD_INPAINT, SD_LATENT_RGB, unet_channels=9
    ),
    "sdxl-inpaint": Family(
        "SDXL inpainting",
        "sdxl-inpaint",
        *SDXL_INPAINT,
        SDXL_LATENT_RGB,
        default_size=1024,
        inpaint=StableDiffusionXLInpaintPipeline,
        unet_channels=9,
    ),
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


def real_path(path: Path) -> Path | None:
    """Where a path leads once links are followed, or None if nothing is there (or the name cannot be a path)."""
    try:
        return path.resolve() if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # a name too long, a link loop
        return None


def model_folders(models_dir: Path | str) -> list[Path]:
    """The models folders of the setting, in search order: several are joined by os.pathsep, as in PATH."""
    return [Path(part).expanduser().absolute() for part in str(models_dir).split(os.pathsep) if part]


def check_model_name(name: str, field: str = "model") -> None:
    """A name from the network may only walk down the models folders: links inside them are the owner's
    business and are followed, but the name itself may not climb out or smuggle in another path syntax."""
    if "\0" in name:
        raise ImagineError(f"{field} must not contain a NUL byte")
    if "\\" in name:
        raise ImagineError(f"{field} {name!r} must not contain a backslash; separate folders with /")
    if ".." in Path(name).parts:
        raise ImagineError(f"{field} {name!r} must not contain '..'; name a model inside the models folders", 403)


def relative_to_folders(name: str, folders: list[Path]) -> str:
    """A request's name relative to the models folders: an absolute name must lie, as written, inside one."""
    path = Path(name)
    if not path.is_absolute():
        return name
    for folder in folders:
        for root in (folder, real_path(folder)):
            if root is not None and path.is_relative_to(root) and path != root:
                return str(path.relative_to(root))
    raise ImagineError(
        f"model {name!r} is outside the models folders; add its folder to --models-dir (IMAGINE_MODELS_DIR)", 403
    )


def find_in_folders(folders: list[Path], name: str, suffixes: tuple = ()) -> Path | None:
    """The first entry `name` (or `name` plus one of `suffixes`) in the folders, searched in order, links followed.

    Returns the path as found (not resolved), or None. Meant for any kind of file under the models folders:
    checkpoints here, `loras/` or `embeddings/` entries with their own sub-folder prefixed to `name`."""
    for folder in folders:
        entry = folder / name
        for candidate in (entry, *(entry.with_name(entry.name + suffix) for suffix in suffixes)):
            if real_path(candidate) is not None:
                return candidate
    return None


def walk_folders(folders: list[Path], skip: tuple = ()):
    """Every file and folder under the models folders as (name relative to its folder, path), links followed,
    each real folder entered once (a link loop ends there), top-level sub-folders in `skip` left out."""
    entered = set()
    for folder in folders:
        for directory, subdirs, files in os.walk(folder, followlinks=True):
            try:
                real = os.stat(directory)
            except OSError:
                subdirs[:] = []
                continue
            if (real.st_dev, real.st_ino) in entered:
                subdirs[:] = []
                continue
            entered.add((real.st_dev, real.st_ino))
            relative = Path(directory).relative_to(folder)
            if relative == Path():
                subdirs[:] = [d for d in subdirs if d not in skip]
            entries = sorted(subdirs) + sorted(files)
            # A diffusers folder is one model: its parts (unet/, vae/...) are not entries of their own.
            subdirs[:] = sorted(d for d in subdirs if not (Path(directory, d, "model_index.json")).is_file())
            for entry in entries:
                yield (relative / entry).as_posix(), Path(directory) / entry


def is_repo_id(name: str) -> bool:
    """'owner/repo', as the Hugging Face hub names models; never a path."""
    parts = name.split("/")
    return len(parts) == 2 and all(part and part not in (".", "..") and part.strip() == part for part in parts)


@dataclasses.dataclass
class LoadedModel:
    name: str
    family: Family
    txt2img: DiffusionPipeline
    img2img: DiffusionPipeline  # built from txt2img's modules: the weights exist once
    scheduler_config: dict  # the model's own scheduler settings, the base of every sampler
    schedulers: dict = dataclasses.field(default_factory=dict)  # (sampler, prediction) -> its scheduler, built once
    cancelled: object = None  # while a job runs, its cancelled(): checked at the cancel points (add_cancel_points)
    inpaint: DiffusionPipeline = None  # built from txt2img's modules too
    loras: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)  # path -> adapter
    lora_hashes: dict = dataclasses.field(default_factory=dict)  # adapter -> short hash (see lora_short_hash)
    adapter_numbers: itertools.count = dataclasses.field(default_factory=itertools.count)
    embeddings: dict = dataclasses.field(default_factory=dict)  # name -> vectors per text encoder, read once


class Models:
    """Finds models by name, loads them once, and keeps the `max_loaded` most recently used."""

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype, configs_dir: Path = CONFIGS_DIR):
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.configs_dir = configs_dir
        self.loaded = collections.OrderedDict()  # model key -> LoadedModel, least recently used first
        self.family_cache = {}  # (path, size, mtime) -> what describe() read from the file's header

    def resolve(self, name: str | None) -> str:
        """Turns a request's model name into the key it is loaded and cached under: 'demo', a path, or a hub repo id.

        The name comes from the network, so it may only name entries of the models folders (see
        check_model_name); links inside them are followed. Only the configured default model may live elsewhere.
        """
        configured = name is None or name == self.settings.model
        name = self.settings.model if name is None else name
        if name == DEMO_MODEL:
            return DEMO_MODEL
        folders = model_folders(self.settings.models_dir)
        if configured:
            found = find_in_folders(folders, name, CHECKPOINT_SUFFIXES)
            found = found or find_in_folders([Path.cwd()], str(Path(name).expanduser()), CHECKPOINT_SUFFIXES)
        else:
            check_model_name(name)
            found = find_in_folders(folders, relative_to_folders(name, folders), CHECKPOINT_SUFFIXES)
        if found is not None:
            real = real_path(found)
            if real is not None and (real.is_dir() or (real.is_file() and found.suffix in CHECKPOINT_SUFFIXES)):
                return str(real)
            raise ImagineError(f"model {name!r} is not a .safetensors or .ckpt file or a diffusers folder")
        if self.settings.allow_downloads and is_repo_id(name):
            return name
        raise ImagineError(
            f"model {name!r} not found in the models folders (--models-dir, IMAGINE_MODELS_DIR); "
            "GET /models lists the models there, and 'demo' is always there",
            404,
        )

    def listing(self) -> list[dict]:
        """Every model a request can name, in the order the folders are searched: single files and diffusers
        folders, recursively, links followed; LoRAs and embeddings, which live in their own sub-folders, left out."""
        folders = model_folders(self.settings.models_dir)
        listed = []
        for relative, path in walk_folders(folders, skip=NOT_CHECKPOINTS):
            real = real_path(path)
            if real is None or not is_model_entry(path, real):
                continue
            name = model_name(folders, relative, real)
            if name is None:  # an entry of a later folder that an earlier one's entry of the same name hides
                continue
            try:
                described = self.describe(real)
            except OSError as error:  # e.g. a folder inside it that this server's user may not read
                described = {"family": None, "error": f"cannot be read ({error.strerror})", "size": 0, "modified": None}
            listed.append({"name": name, **described, "loaded": str(real) in self.loaded})
        return listed

    def describe(self, real: Path) -> dict:
        """Family, size and date of a model file or folder; the family is cached by path, size and date."""
        stat = real.stat()
        size = stat.st_size if real.is_file() else sum(f.stat().st_size for f in real.rglob("*") if f.is_file())
        key = (str(real), stat.st_size, stat.st_mtime_ns)
        if key not in self.family_cache:
            try:
                self.family_cache[key] = {"family": self.family_of(str(real)).config}
            except ImagineError as error:
                self.family_cache[key] = {"family": None, "error": error.message}
            except Exception as error:  # noqa: BLE001 (a listing must answer whatever a file holds)
                self.family_cache[key] = {"family": None, "error": f"cannot be read ({type(error).__name__})"}
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime))
        return {**self.family_cache[key], "size": size, "modified": modified}

    def get(self, key: str) -> LoadedModel:
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        # Check the model before unloading another for it: a request for a file that cannot load
        # must not cost the next request a reload of the model it evicted.
        family = self.family_of(key)
        evicted = []
        while len(self.loaded) >= self.settings.max_loaded:
            evicted.append(next(iter(self.loaded)))
            self.unload(evicted[-1])
        started = time.perf_counter()
        try:
            model = self.load_or_refuse(key, family)
        except ImagineError:
            # The memory is freed before loading (two large models may not fit), so a model that fails
            # to load puts back the ones it evicted: the next request finds them as they were.
            for each in evicted:
                self.reload(each)
            raise
        log.info("loaded %s (%s) in %.1f s", model.name, model.family.label, time.perf_counter() - started)
        self.loaded[key] = model
        return model

    def load_or_refuse(self, key: str, family: Family) -> LoadedModel:
        """load(), with a model whose files are missing or damaged refused in words that name no server path."""
        try:
            return self.load(key, family)
        except (ImagineError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            log.exception("cannot load %s", key)
            raise ImagineError(
                f"the model cannot be loaded: its files are incomplete or damaged ({type(error).__name__}); "
                "the server log has the details",
                422,
            ) from None

    def reload(self, key: str) -> None:
        try:
            self.loaded[key] = self.load(key, self.family_of(key))
            log.info("reloaded %s", self.loaded[key].name)
        except Exception:
            log.exception("cannot reload %s", key)

    def unload(self, key: str) -> None:
        log.info("unloading %s", self.loaded.pop(key).name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def family_of(self, key: str) -> Family:
        """The model's family, from a glance at the file or folder; refuses what cannot be loaded."""
        path = Path(key)
        if key == DEMO_MODEL or not path.exists():  # the demo, or a hub repo id (downloads allowed)
            return FAMILIES["sd1"]
        if path.is_dir():
            return folder_family(path)
        refuse_pickles_that_could_run(path)
        try:
            keys = read_checkpoint_keys(path)
            channels = unet_input_channels(path)
        except Exception as error:  # a truncated download, or a .ckpt holding more than tensors
            raise ImagineError(f"the model file cannot be read as a checkpoint ({type(error).__name__})") from error
        name = detect_family(keys)
        family = sd2_family(path) if name == "sd2" else FAMILIES[name]
        return FAMILIES[INPAINT_FAMILIES[family.config]] if channels == 9 else family

    def load(self, key: str, family: Family) -> LoadedModel:
        path = Path(key)
        if key == DEMO_MODEL:
            pipe = build_demo_pipeline(self.configs_dir / family.config)
        elif path.is_dir():
            pipe = family.txt2img.from_pretrained(path, local_files_only=True, torch_dtype=self.dtype)
        elif path.is_file():
            # `config=` a local folder is what keeps this offline: without it diffusers fetches a
            # reference repo's configs and tokenizer from the hub (see configs/README.md).
            pipe = family.txt2img.from_single_file(
                key, config=str(self.configs_dir / family.config), local_files_only=True, torch_dtype=self.dtype
            )
        else:
            pipe = self.download(key, family)
        pipe = pipe.to(device=self.device, dtype=self.dtype)
        pipe.vae.enable_slicing()  # a batch decodes one picture at a time: the memory of one, in the same time
        self.speed_up_unet(pipe)
        img2img = family.img2img(**pipe.components)
        inpaint = family.inpaint(**pipe.components)
        for each in (pipe, img2img, inpaint):
            each.set_progress_bar_config(disable=True)
        model = LoadedModel(
            path.stem if path.is_file() else path.name,
            family,
            pipe,
            img2img,
            dict(pipe.scheduler.config),
            inpaint=inpaint,
        )
        add_cancel_points(model)
        return model

    def speed_up_unet(self, pipe) -> None:
        """GPU options that pay off; attention already uses PyTorch's fused SDPA (diffusers' default)."""
        if self.device.type == "cuda":
            # diffusers measured 9 % faster fp16 steps on an NVIDIA GPU (not measured here: no GPU);
            # on a 2-core CPU it measured slower (1.52 s a step against 1.35 s), so GPUs only.
            pipe.unet.to(memory_format=torch.channels_last)
        if self.settings.compile:
            # Compiles on the first generation at each new size (minutes); later steps run faster on GPUs
            # (1.2-2x reported on an A100). On a 2-core CPU it did not help: 1.61-1.77 s a step against
            # 1.30-1.40 s eager, after 100 s of compiling.
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)

    def download(self, repo_id: str, family: Family):
        try:
            return family.txt2img.from_pretrained(repo_id, torch_dtype=self.dtype)
        except (OSError, ValueError) as error:
            raise ImagineError(f"model {repo_id!r} could not be downloaded: {error}", 502) from error


def pipeline_class_name(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names, or None where it names none readably."""
    try:
        index = json.loads((folder / "model_index.json").read_bytes())
    except (OSError, ValueError, RecursionError):  # missing, not JSON, not UTF-8
        return None
    return index.get("_class_name") if isinstance(index, dict) else None


# Modules before which a generation checks whether it was cancelled: every ResNet block, attention and
# feed-forward layer of the UNet and VAE, and every text-encoder layer. A step of SD1.5 at 512x512 runs
# about 100 of them, so a cancel takes effect within a small part of a step rather than at its end.
CANCEL_POINTS = ("ResnetBlock2D", "Attention", "FeedForward", "CLIPEncoderLayer")


def add_cancel_points(model: LoadedModel) -> None:
    """Makes each cancel point raise Cancelled once `model.cancelled()` says so. The hooks raise before a
    module runs and no module keeps state between calls, so nothing is left half-changed for the next run."""

    def stop_if_cancelled(module, args):
        if model.cancelled is not None and model.cancelled():
            raise Cancelled

    for component in model.txt2img.components.values():
        # A compiled UNet (--compile) is traced whole (fullgraph); a hook that may raise would break that.
        if isinstance(component, torch.nn.Module) and not hasattr(component, "_orig_mod"):
            for module in component.modules():
                if type(module).__name__ in CANCEL_POINTS:
                    module.register_forward_pre_hook(stop_if_cancelled)


NOT_CHECKPOINTS = ("loras", "embeddings")  # sub-folders of a models folder that hold other kinds of files


def is_model_entry(path: Path, real: Path) -> bool:
    """A checkpoint file or a diffusers pipeline folder."""
    if real.is_dir():
        return (real / "model_index.json").is_file()
    return path.suffix in CHECKPOINT_SUFFIXES


def model_name(folders: list[Path], relative: str, real: Path) -> str | None:
    """The shortest name that a request can pass to reach this entry: without its suffix where that is unambiguous."""
    short = relative.removesuffix(Path(relative).suffix) if Path(relative).suffix in CHECKPOINT_SUFFIXES else None
    for name in (short, relative):
        found = name and find_in_folders(folders, name, CHECKPOINT_SUFFIXES)
        if found and real_path(found) == real:
            return name
    return None


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
        channels = json.loads((path / "unet" / "config.json").read_text()).get("in_channels", 4)
    except (OSError, ValueError, AttributeError):
        channels = 4  # diffusers itself will say what is missing
    return FAMILIES[INPAINT_FAMILIES[family.config]] if channels == 9 else family


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
        text_encoder = json.loads((path / "text_encoder" / "config.json").read_text())
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None  # diffusers itself will say what is missing
    if not (isinstance(text_encoder, dict) and isinstance(scheduler, dict)):
        return None
    if text_encoder.get("hidden_act") != "gelu":
        return None
    return FAMILIES["sd2-v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"]


def build_tiny_vae(**config) -> AutoencoderKL:
    """A VAE of a few MB with four blocks, as in the real model: latents are 1/8 of the image, so
    previews and img2img see the same geometry as with a real checkpoint."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        **config,
    )


def build_demo_pipeline(config_dir: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion with random weights, built in about a second: its pictures are noise.

    It runs the real pipeline end to end (tokenizer, text encoder, UNet, VAE, samplers), so a fresh
    machine can prove the whole path without a multi-gigabyte download. The same seed builds the same
    weights, so the demo model gives the same picture for the same request across restarts.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = build_tiny_vae()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                vocab_size=49408,
                max_position_embeddings=77,
            )
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(config_dir / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(config_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------
# Samplers: the A1111 names people know, mapped to diffusers schedulers
# ---------------------------------------------------------------------------------------------

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm++ 2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # diffusers has no exact DPM++ 2S; its single-step second-order DPM-Solver++ is the usual stand-in.
    "dpm++ 2s": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++ sde": (DPMSolverSDEScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2 a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm++ 2m sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    # For LCM and LCM-LoRA, turbo and lightning models: 4-8 steps at a guidance of 1-2.
    "lcm": (LCMScheduler, {}),
}
# "<name> karras": the same sampler on the Karras et al. noise schedule, for every sampler whose
# diffusers scheduler offers it (DDIM and Euler a do not). A plain name turns it off explicitly:
# some models' own scheduler configs switch it on, and the name should mean the same on every model.
for _name in ("euler", "heun", "lms", "dpm++ 2m", "dpm++ 2s", "dpm++ sde", "dpm2", "dpm2 a", "dpm++ 2m sde"):
    _cls, _options = SAMPLERS[_name]
    SAMPLERS[_name] = (_cls, {**_options, "use_karras_sigmas": False})
    SAMPLERS[f"{_name} karras"] = (_cls, {**_options, "use_karras_sigmas": True})
DEFAULT_SAMPLER = "dpm++ 2m"


def make_scheduler(sampler: str, base_config: dict, seed: int):
    """A scheduler for `sampler` on the model's own settings (`base_config`)."""
    cls, options = SAMPLERS[sampler]
    if cls is DPMSolverSDEScheduler:
        # Its Brownian noise has its own seed; tie it to the request's so the picture repeats.
        options = {**options, "noise_sampler_seed": seed}
    return cls.from_config(base_config, **options)


# ---------------------------------------------------------------------------------------------
# Previews: latents to RGB with a fixed 4x3 matrix, no VAE (a VAE decode costs more than a step)
# ---------------------------------------------------------------------------------------------


PREVIEW_MODES = ("fast", "full")  # fast: the 4x3 mapping below; full: a VAE decode, costlier than a step


def predicted_clean(scheduler, output) -> torch.Tensor | None:
    """The scheduler's prediction of the finished latents at this step, which it computes anyway.

    Most samplers return it beside the next latents; DPM-Solver++ keeps it as its last model output.
    A preview of it already shows the picture, where the current latents still show mostly noise.
    """
    if len(output) > 1:
        return output[1]
    if getattr(scheduler.config, "algorithm_type", None) in ("dpmsolver++", "sde-dpmsolver++"):
        return scheduler.model_outputs[-1]
    return None


def keep_predictions(scheduler):
    """Makes `scheduler.step` keep each step's predicted clean latents in `scheduler.predicted`."""
    step = scheduler.step

    # wraps() keeps step's signature, which the pipeline inspects to decide whether to pass the
    # generator: without it the ancestral samplers would draw unseeded noise.
    @functools.wraps(step)
    def step_and_keep(*args, **kwargs):
        output = step(*args, **kwargs)
        scheduler.predicted = predicted_clean(scheduler, output)
        return output

    scheduler.step = step_and_keep
    scheduler.predicted = None
    return scheduler


def vae_preview(vae, latents: torch.Tensor) -> Image.Image:
    """A full decode, as the pipeline does for the final picture: the real look, at the cost of a step or more."""
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample[0]
    pixels = ((decoded.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.cpu().numpy())


def latents_to_preview(latents: torch.Tensor, latent_rgb: tuple, size: tuple) -> Image.Image:
    factors = torch.tensor(latent_rgb, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), factors)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)


def png_bytes(image: Image.Image, parameters: str | None = None, compress_level: int = 6) -> bytes:
    """A PNG, with the generation settings in a `parameters` text chunk when given."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def png_base64(image: Image.Image, parameters: str | None = None, compress_level: int = 6) -> str:
    return base64.b64encode(png_bytes(image, parameters, compress_level)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Requests: every field checked before any work, errors naming the field and the value
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationRequest:
    prompt: str
    model: str | None = None
    width: int | None = None  # None: the model family's default size, known once the model is loaded
    height: int | None = None
    num_steps: int = 25
    guidance: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    seed: int | None = None
    neg: str = ""
    img: Image.Image | None = None
    strength: float = 0.8
    stream: int = 0
    prediction: str | None = None  # None: what the model's config says
    preview: str = "fast"
    mask: Image.Image | None = None  # L, the size of img: white repaints, black keeps
    mask_blur: int = 4
    inpaint_area: str = "whole"
    inpaint_padding: int = 32
    n: int = 1  # pictures, with seeds seed, seed+1, ...
    clip_skip: int = 1  # 1: the text encoder's last layer; 2: the one before, as AUTOMATIC1111 counts
    loras: list = dataclasses.field(default_factory=list)  # (name, weight): the field's, then the prompt's tags


INPAINT_AREAS = ("whole", "masked")  # A1111's "Whole picture" and "Only masked"
MASK_STRENGTH = 0.75  # A1111's default denoising strength for inpainting
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 256

# What the model predicts at each step, for a request's `prediction` field: the noise ("epsilon",
# SD1, SDXL, SD2 512) or "v" (SD2 768-v). Only needed where a checkpoint's kind is guessed wrong.
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}

REQUEST_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}


def _value(body, field, kinds, kind_name):
    value = body[field]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ImagineError(f"{field} must be {kind_name}, not {json.dumps(value)[:80]}")
    return value


def _in_range(field, value, low, high):
    if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise ImagineError(f"{field} must be between {low} and {high}, not {value}")
    return value


def _integer(body, field, default, low, high):
    if body.get(field) is None:
        return default
    return _in_range(field, _value(body, field, int, "an integer"), low, high)


def _number(body, field, default, low, high):
    if body.get(field) is None:
        return default
    return float(_in_range(field, _value(body, field, (int, float), "a number"), low, high))


def _text(body, field, default, max_chars=None):
    if body.get(field) is None:
        return default
    text = _value(body, field, str, "a string")
    if max_chars is not None and len(text) > max_chars:
        raise ImagineError(f"{field} is {len(text)} characters long; at most {max_chars} are accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON may escape half of a surrogate pair ("\ud800"), which is no text
        bad = text[error.start : error.end].encode("unicode_escape").decode()
        raise ImagineError(f"{field} must be valid Unicode text, not a lone surrogate {bad}") from None
    return text


def _seed(body):
    """The seed, or None for a random one: left out, null, or -1 as AUTOMATIC1111's users send it."""
    if body.get("seed") == -1 and isinstance(body["seed"], int):
        return None
    return _integer(body, "seed", None, 0, MAX_SEED)


def _size(body, field, default, max_size):
    size = _integer(body, field, default, MIN_SIZE, max_size)
    if size is not None and size % 8:
        raise ImagineError(f"{field} must be a multiple of 8, not {size}")
    return size


def decode_image(data: str, field: str = "img", mode: str = "RGB") -> Image.Image:
    """The one way a request's picture is read: a data URI (`data:image/png;base64,...`) or bare base64
    of a PNG, JPEG, WEBP, BMP or GIF (its first frame), converted to `mode`; `field` names the request field
    in errors."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ImagineError(f"{field} must be a base64 data URI (data:image/...;base64,...)")
    try:
        # Line breaks are allowed: `base64` wraps its output at 76 columns.
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImagineError(f"{field} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if image.width * image.height > MAX_IMG_PIXELS:  # from the header: nothing is decoded yet
            raise ImagineError(f"{field} is {image.width}x{image.height}; at most {MAX_IMG_PIXELS} pixels are accepted")
        image.load()
        return image.convert(mode)
    except Image.DecompressionBombError:
        raise ImagineError(f"{field} has too many pixels to be decoded safely") from None
    except UnidentifiedImageError:
        raise ImagineError(f"{field} is not a picture in a format accepted: {', '.join(IMAGE_FORMATS)}") from None
    except ImagineError:
        raise
    except Exception:  # a damaged file: Pillow's decoders raise OSError, SyntaxError, EOFError, struct.error...
        raise ImagineError(f"{field} is a damaged picture that cannot be decoded") from None


def parse_mask(body: dict, img: Image.Image | None) -> Image.Image | None:
    """The mask as L at the input picture's size (A1111's convention: white repaints, black keeps, grey is partial)."""
    if body.get("mask") is None:
        return None
    if img is None:
        raise ImagineError("mask needs img: the picture whose white-masked part is repainted")
    mask = decode_image(_text(body, "mask", None), "mask", "L")
    if mask.getbbox() is None:
        raise ImagineError("mask is all black: nothing to repaint; white marks what to repaint")
    return mask if mask.size == img.size else mask.resize(img.size, Image.Resampling.LANCZOS)


def parse_request(body: dict, max_size: int = MAX_SIZE, max_batch: int = MAX_BATCH) -> GenerationRequest:
    """Checks every field of a /generate body and returns the request, or raises naming the bad field."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise ImagineError(f"unknown field {unknown[0]!r}; the fields are: {', '.join(sorted(REQUEST_FIELDS))}")
    if body.get("prompt") is None:
        raise ImagineError("prompt is required")
    if body.get("model") == "":
        raise ImagineError("model must name a model, not be empty; leave it out for the default")
    defaults = GenerationRequest(prompt="")
    # The texts first: they are cheap to check, and an image is costly to decode.
    prompt, neg = _text(body, "prompt", "", MAX_PROMPT_CHARS), _text(body, "neg", defaults.neg, MAX_PROMPT_CHARS)
    img = None
    if body.get("img") is not None:
        img = decode_image(_text(body, "img", None))
    # img2img keeps the input's size unless asked otherwise (rounded down to a multiple of 8); txt2img
    # takes the model's default size (512, 768 or 1024 by family) for a size it leaves out.
    default_width, default_height = (img.width // 8 * 8, img.height // 8 * 8) if img else (None, None)
    width, height = _size(body, "width", default_width, max_size), _size(body, "height", default_height, max_size)
    # Sizes given in the body were checked above; one taken from img may still be out of range.
    if img is not None and not (MIN_SIZE <= width <= max_size and MIN_SIZE <= height <= max_size):
        raise ImagineError(f"img is {img.width}x{img.height}; give width and height from {MIN_SIZE} to {max_size}")
    sampler = _text(body, "sampler", defaults.sampler).strip().lower()
    if sampler not in SAMPLERS:
        raise ImagineError(f"sampler {sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    prediction = _text(body, "prediction", None)
    if prediction is not None and prediction not in PREDICTIONS:
        raise ImagineError(f"prediction must be 'epsilon' or 'v', not {prediction!r}")
    preview = _text(body, "preview", defaults.preview)
    if preview not in PREVIEW_MODES:
        raise ImagineError(f"preview must be one of: {', '.join(PREVIEW_MODES)}, not {preview!r}")
    mask = parse_mask(body, img)
    inpaint_area = _text(body, "inpaint_area", defaults.inpaint_area)
    if inpaint_area not in INPAINT_AREAS:
        raise ImagineError(f"inpaint_area must be one of: {', '.join(INPAINT_AREAS)}, not {inpaint_area!r}")
    parsed = GenerationRequest(
        prompt=prompt,
        model=_text(body, "model", None),
        width=width,
        height=height,
        num_steps=_integer(body, "num_steps", defaults.num_steps, 1, MAX_STEPS),
        guidance=_number(body, "guidance", defaults.guidance, 0.0, MAX_GUIDANCE),
        sampler=sampler,
        seed=_seed(body),
        neg=neg,
        img=img,
        strength=_number(body, "strength", MASK_STRENGTH if mask else defaults.strength, 0.0, 1.0),
        stream=_integer(body, "stream", 0, 0, MAX_STEPS),
        prediction=prediction,
        preview=preview,
        mask=mask,
        mask_blur=_integer(body, "mask_blur", defaults.mask_blur, 0, MAX_MASK_BLUR),
        inpaint_area=inpaint_area,
        inpaint_padding=_integer(body, "inpaint_padding", defaults.inpaint_padding, 0, MAX_INPAINT_PADDING),
        n=_integer(body, "n", defaults.n, 1, max_batch),
        clip_skip=_integer(body, "clip_skip", defaults.clip_skip, 1, MAX_CLIP_SKIP),
        loras=checked_loras(lora_field(body) + lora_tags(_text(body, "prompt", ""))),
    )
    parse_prompt_attention(parsed.prompt)  # a weight that is no number is refused now, not after the queue
    parse_prompt_attention(parsed.neg, "neg")
    if img is not None and int(parsed.num_steps * parsed.strength) < 1:
        raise ImagineError(
            f"strength {parsed.strength} with num_steps {parsed.num_steps} leaves no step to run; raise either"
        )
    return parsed


def sampler_label(sampler: str) -> str:
    """The AUTOMATIC1111 spelling of a sampler name: 'dpm++ 2m karras' -> 'DPM++ 2M Karras'."""
    words = {"a": "a", "euler": "Euler", "heun": "Heun", "karras": "Karras"}
    return " ".join(words.get(word, word.upper()) for word in sampler.split())


def generation_parameters(req: GenerationRequest, model_name: str, lora_hashes: dict | None = None) -> str:
    """The settings of a picture in the text layout AUTOMATIC1111 writes, which image viewers and
    prompt readers understand: the prompt, the negative prompt, then one line of `key: value` pairs."""
    lines = [req.prompt, f"Negative prompt: {req.neg}"] if req.neg else [req.prompt]
    settings = {
        "Steps": req.num_steps,
        "Sampler": sampler_label(req.sampler),
        "CFG scale": req.guidance,
        "Seed": req.seed,
        "Size": f"{req.width}x{req.height}",
        "Model": model_name,
    }
    if req.img is not None:
        settings["Denoising strength"] = req.strength
    if req.mask is not None:
        settings["Mask blur"] = req.mask_blur
        if req.inpaint_area == "masked":
            settings["Inpaint area"] = "Only masked"
            settings["Masked area padding"] = req.inpaint_padding
    if req.clip_skip != 1:
        settings["Clip skip"] = req.clip_skip
    if lora_hashes:  # quoted as JSON, as A1111 writes a value holding commas or colons
        hashes = ", ".join(f"{name}: {short}" for name, short in lora_hashes.items())
        settings["Lora hashes"] = json.dumps(hashes, ensure_ascii=False)
    return "\n".join([*lines, ", ".join(f"{key}: {value}" for key, value in settings.items())])


# ---------------------------------------------------------------------------------------------
# Prompts: AUTOMATIC1111's syntax (weights, BREAK), prompts longer than 77 tokens, clip skip
# ---------------------------------------------------------------------------------------------

# One piece of a prompt each: an escaped bracket or backslash, a lone backslash, an opening bracket, a
# weight closing a round bracket (":1.3)"), a closing bracket, a run of plain text, or a lone colon.
PROMPT_PIECE = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
PROMPT_BREAK = re.compile(r"\s*\bBREAK\b\s*")
ATTENTION_STEP = 1.1  # what one pair of () multiplies a weight by, and [] divides it by
CHUNK_TOKENS = 75  # the tokens of one text-encoder pass, between its start and end tokens
COMMA_BACKTRACK = 20  # a chunk full in mid-phrase ends at its last comma if that is this close to the end
BREAK = None  # the weight that marks a BREAK in a parsed prompt


def parse_prompt_attention(text: str, field: str = "prompt") -> list:
    """Splits a prompt into (text, weight) pieces as AUTOMATIC1111 does: `(x)` x1.1, `[x]` /1.1,
    `(x:1.3)`; a bracket left open weighs to the end, a stray closing one is text; `BREAK` becomes
    ("BREAK", BREAK). Neighbours of equal weight are merged."""
    pieces, round_open, square_open = [], [], []

    def multiply(start, factor):
        for index in range(start, len(pieces)):
            if pieces[index][1] is not BREAK:
                pieces[index][1] *= factor

    for match in PROMPT_PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            pieces.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(pieces))
        elif piece == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:
                raise ImagineError(f"{field} weight {weight!r} is not a number") from None
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ATTENTION_STEP)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), 1 / ATTENTION_STEP)
        else:
            for index, part in enumerate(PROMPT_BREAK.split(piece)):
                if index:
                    pieces.append(["BREAK", BREAK])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ATTENTION_STEP)
    for start in square_open:
        multiply(start, 1 / ATTENTION_STEP)
    merged = []
    for piece in pieces:
        if piece[0] == "":  # what BREAK leaves at either side of itself; it tokenizes to nothing
            continue
        if merged and merged[-1][1] == piece[1] and piece[1] is not BREAK:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [tuple(piece) for piece in merged] or [("", 1.0)]


@dataclasses.dataclass
class Chunk:
    """One text-encoder pass: 77 token ids (start, 75, end or padding), a weight for each, and
    textual-inversion vectors to put in place of the token embeddings at some positions."""

    tokens: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)
    vectors: dict = dataclasses.field(default_factory=dict)  # position -> vector


def prompt_chunks(tokenizer, pieces: list, embeddings: dict) -> list:
    """Tokenizes parsed pieces into chunks of 75 tokens, as AUTOMATIC1111 does: a chunk that fills up
    in mid-phrase ends after its last comma if that is within 20 tokens of the end; BREAK ends a
    chunk; an embedding (name -> [n, width] vectors) is never split across two chunks."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, chunk, last_comma = [], Chunk(), -1

    def close(current):
        ids, weights = current.tokens, current.weights
        # Laid out as the tokenizer pads: start, tokens, end, then padding (the end token for CLIP L,
        # "!" for OpenCLIP), so a plain prompt gives exactly the ids diffusers would encode.
        padding = CHUNK_TOKENS - len(ids)
        current.tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
        current.weights = [1.0, *weights, 1.0] + [1.0] * padding
        current.vectors = {position + 1: vector for position, vector in current.vectors.items()}
        chunks.append(current)

    for text, weight in pieces:
        if weight is BREAK:
            close(chunk)
            chunk, last_comma = Chunk(), -1
            continue
        for word in words_and_embeddings(text, embeddings):
            if isinstance(word, torch.Tensor):
                if len(chunk.tokens) + len(word) > CHUNK_TOKENS:
                    close(chunk)
                    chunk, last_comma = Chunk(), -1
                for vector in word:
                    chunk.vectors[len(chunk.tokens)] = vector
                    chunk.tokens.append(0)  # a stand-in id: its embedding is replaced by the vector
                    chunk.weights.append(weight)
                continue
            for token in tokenizer(word, add_special_tokens=False).input_ids:
                if len(chunk.tokens) == CHUNK_TOKENS:
                    backtrack = token != comma and last_comma >= 0 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK
                    keep = last_comma + 1 if backtrack else CHUNK_TOKENS
                    moved = Chunk(chunk.tokens[keep:], chunk.weights[keep:])
                    moved.vectors = {p - keep: v for p, v in chunk.vectors.items() if p >= keep}
                    chunk.vectors = {p: v for p, v in chunk.vectors.items() if p < keep}
                    chunk.tokens, chunk.weights = chunk.tokens[:keep], chunk.weights[:keep]
                    close(chunk)
                    chunk, last_comma = moved, -1
                if token == comma:
                    last_comma = len(chunk.tokens)
                chunk.tokens.append(token)
                chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close(chunk)
    return chunks


def words_and_embeddings(text: str, embeddings: dict) -> list:
    """The text with each embedding's name, as a whole word, replaced by its vectors."""
    if not embeddings:
        return [text]
    names = "|".join(re.escape(name) for name in sorted(embeddings, key=len, reverse=True))
    parts = re.split(rf"(?<![\w-])({names})(?![\w-])", text, flags=re.I)
    return [embeddings[part.lower()] if index % 2 else part for index, part in enumerate(parts) if part]


def encode_chunk(text_encoder, chunk: Chunk, layer: int, final_norm: bool) -> tuple:
    """The hidden states of one chunk at `layer` (-1 the last) and the pooled output, with the
    weights applied as AUTOMATIC1111's default emphasis does: multiplied in, then the chunk scaled
    back to its original mean."""
    device = text_encoder.device
    ids = torch.tensor([chunk.tokens], device=device)
    hook = None
    if chunk.vectors:
        token_embedding = text_encoder.get_input_embeddings()

        def put_vectors(module, inputs, output):
            output = output.clone()
            for position, vector in chunk.vectors.items():
                output[0, position] = vector.to(output.dtype)
            return output

        hook = token_embedding.register_forward_hook(put_vectors)
    try:
        output = text_encoder(ids, output_hidden_states=layer != -1)
    finally:
        if hook is not None:
            hook.remove()
    if layer == -1:
        hidden = output.last_hidden_state
    else:
        hidden = output.hidden_states[layer]
        if final_norm:
            hidden = text_encoder.final_layer_norm(hidden)
    if any(weight != 1.0 for weight in chunk.weights):
        original_mean = hidden.mean()
        hidden = hidden * torch.tensor(chunk.weights, dtype=hidden.dtype, device=device)[None, :, None]
        new_mean = hidden.mean()
        if new_mean != 0:  # a random test model's layer norm can centre every token exactly on 0
            hidden = hidden * (original_mean / new_mean)
    return hidden, output[0] if output[0].ndim == 2 else None


def encode_chunks(text_encoder, chunks: list, layer: int, final_norm: bool) -> tuple:
    """(hidden states of every chunk side by side, pooled output of the first chunk)."""
    encoded = [encode_chunk(text_encoder, chunk, layer, final_norm) for chunk in chunks]
    return torch.cat([hidden for hidden, _ in encoded], dim=1), encoded[0][1]


def prompt_embeddings(pipe, prompt: str, neg: str, clip_skip: int, embeddings: dict) -> dict:
    """The prompt and negative prompt encoded for the pipeline's `prompt_embeds` arguments.

    `clip_skip` N takes the hidden states N-1 layers before the one the family uses by default: SD1
    and SD2 use the last layer (SD2's diffusers text encoder already ends at OpenCLIP's penultimate),
    with its final layer norm applied, as AUTOMATIC1111 does; SDXL uses the penultimate layer of both
    encoders, unnormalized, so N moves both further back (diffusers' clip_skip N-1).
    `embeddings` maps a name to its vectors for each text encoder (see embedding_vectors).
    """
    parsed = [parse_prompt_attention(prompt), parse_prompt_attention(neg, "neg")]
    encoders = [(pipe.tokenizer, pipe.text_encoder, "clip_l")]
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))
    layer = -clip_skip - 1 if sdxl else -clip_skip
    for _, text_encoder, _ in encoders:
        layers = text_encoder.config.num_hidden_layers
        if clip_skip > layers:
            raise ImagineError(f"clip_skip {clip_skip} is more than this model's text encoder has ({layers} layers)")
    hidden, pooled = [[], []], [None, None]
    for tokenizer, text_encoder, key in encoders:
        vectors = {name: each[key] for name, each in embeddings.items()}
        chunks = [prompt_chunks(tokenizer, pieces, vectors) for pieces in parsed]
        # The shorter of prompt and negative prompt gets chunks of the empty prompt, so that both line up.
        count = max(len(each) for each in chunks)
        for index, each in enumerate(chunks):
            each += prompt_chunks(tokenizer, [("", 1.0)], {}) * (count - len(each))
            states, pooled[index] = encode_chunks(text_encoder, each, layer, not sdxl)
            hidden[index].append(states)
    arguments = {"prompt_embeds": torch.cat(hidden[0], dim=-1), "negative_prompt_embeds": torch.cat(hidden[1], dim=-1)}
    if sdxl:
        arguments |= {"pooled_prompt_embeds": pooled[0], "negative_pooled_prompt_embeds": pooled[1]}
    return arguments


# ---------------------------------------------------------------------------------------------
# LoRA and embeddings: files beside the models, loaded once per model, switched per request
# ---------------------------------------------------------------------------------------------

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt")
MAX_LORA_WEIGHT = 5.0
MAX_LORAS_KEPT = 8  # adapters kept loaded per model; the least recently used is deleted first
LORA_TAG = re.compile(r"<lora:([^>]*)>")


def extra_folders(settings: Settings, kind: str) -> list:
    """Where `loras` or `embeddings` live: that sub-folder of every models folder, in search order."""
    return [folder / kind for folder in model_folders(settings.models_dir)]


def list_files(settings: Settings, kind: str, suffixes: tuple) -> dict:
    """name -> path of every file of `kind` (a name is the path below its folder, without the suffix), links
    followed as for models; the first folder wins where two hold the same name."""
    found = {}
    for name, path in walk_folders(extra_folders(settings, kind)):
        if path.suffix in suffixes and path.is_file():
            found.setdefault(name.removesuffix(path.suffix), path)
    return found


def find_file(settings: Settings, kind: str, what: str, name: str, suffixes: tuple) -> Path:
    """A file of `kind` by a name from the network: as for models, the name may only walk down the folders."""
    if "\0" in name or not name.strip():
        raise ImagineError(f"{what} name {name!r} is not a file name")
    if "\\" in name or ".." in Path(name).parts:
        raise ImagineError(f"{what} {name!r} is outside the {kind} folder", 403)
    found = None if Path(name).is_absolute() else find_in_folders(extra_folders(settings, kind), name, suffixes)
    real = found and real_path(found)
    if not real or not real.is_file() or found.suffix not in suffixes:
        raise ImagineError(f"{what} {name!r} not found in the {kind} folder")
    return real


def read_tensors(path: Path, what: str) -> tuple:
    """(tensors, metadata) of a .safetensors file, or of a .pt/.ckpt read with torch.load(weights_only=True);
    a file that cannot be read is refused naming `what` (e.g. "lora 'add_detail'")."""
    if path.suffix != ".safetensors":
        refuse_pickles_that_could_run(path.with_suffix(".ckpt"))  # .pt too: the same pickle
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()  # safe_open is not iterable
                return {name: f.get_tensor(name) for name in names}, f.metadata() or {}
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as error:  # a truncated download, or a pickle holding more than tensors
        raise ImagineError(f"{what} cannot be read ({type(error).__name__})") from error


def family_group(family: Family) -> str:
    """'sd1', 'sd2' or 'sdxl': what a LoRA or embedding must have been trained for."""
    name = next(name for name, each in FAMILIES.items() if each is family)
    return name.removesuffix("-inpaint").removesuffix("-v")


def lora_family(keys, metadata: dict) -> str | None:
    """The family a LoRA file was trained for, from kohya's metadata or its key layout; None if it does not say."""
    base = metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")
    if "xl" in base:
        return "sdxl"
    if base.startswith(("sd_v2", "stable-diffusion-v2")) or metadata.get("ss_v2") == "True":
        return "sd2"
    if base.startswith(("sd_v1", "stable-diffusion-v1")):
        return "sd1"
    sdxl_keys = ("lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks", "text_encoder_2.")
    if any(key.startswith(sdxl_keys) for key in keys):
        return "sdxl"
    return None


def lora_listing(settings: Settings) -> list:
    listing = []
    for name, path in list_files(settings, "loras", LORA_SUFFIXES).items():
        family = None
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    family = lora_family(f.keys(), f.metadata() or {})
            except Exception:  # a broken file is listed; using it gets a 400 that says why
                family = None
        listing.append({"name": name, "size": path.stat().st_size, "family": family})
    return listing


def lora_tags(prompt: str) -> list:
    """The (name, weight) of each `<lora:name:weight>` in a prompt; the weight may be left out (1.0)."""
    found = []
    for tag in LORA_TAG.findall(prompt):
        name, _, weight = tag.partition(":")
        try:
            found.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ImagineError(f"<lora:{tag}> must be <lora:name> or <lora:name:weight>, weight a number") from None
    return found


def without_lora_tags(prompt: str) -> str:
    return LORA_TAG.sub("", prompt)


def lora_field(body: dict) -> list:
    """The request's `loras` field: [{"name": ..., "weight": ...}], weight optional (1.0)."""
    value = body.get("loras")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(each, dict) for each in value):
        raise ImagineError('loras must be a list like [{"name": "add_detail", "weight": 0.8}]')
    loras = []
    for each in value:
        if set(each) - {"name", "weight"} or not isinstance(each.get("name"), str):
            raise ImagineError(f"loras entries have a name and a weight, not {json.dumps(each)[:80]}")
        loras.append((each["name"], _number(each, "weight", 1.0, -math.inf, math.inf)))
    return loras


def checked_loras(loras: list) -> list:
    if len(loras) > MAX_LORAS_KEPT:
        raise ImagineError(f"a request may use at most {MAX_LORAS_KEPT} loras, not {len(loras)}")
    for name, weight in loras:
        if not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
            raise ImagineError(f"lora {name!r} weight must be between -5 and 5, not {weight}")
    return loras


def load_lora(settings: Settings, model: LoadedModel, name: str) -> str:
    """The adapter name of LoRA `name` on `model`, loaded on first use and kept (MAX_LORAS_KEPT per model).

    A file that cannot be loaded leaves no part of itself behind: what diffusers had attached is deleted.
    """
    path = find_file(settings, "loras", "lora", name, LORA_SUFFIXES)
    key = str(path)
    if key in model.loras:
        model.loras.move_to_end(key)
        return model.loras[key]
    tensors, metadata = read_tensors(path, f"lora {name!r}")
    if any("hada_" in key or "lokr_" in key for key in tensors):
        raise ImagineError(f"lora {name!r} is a LoHa/LoKr (LyCORIS) file; only LoRA files can be loaded")
    family, wanted = lora_family(tensors, metadata), family_group(model.family)
    if family is not None and family != wanted:
        raise ImagineError(f"lora {name!r} is for {FAMILIES[family].label}; the model is {model.family.label}")
    if len(model.loras) >= MAX_LORAS_KEPT:
        evicted = model.loras.popitem(last=False)[1]
        model.txt2img.delete_adapters(evicted)
        del model.lora_hashes[evicted]
    adapter = f"lora{next(model.adapter_numbers)}"  # peft adapter names may not hold the dots of a file name
    pipe = model.txt2img
    try:
        pipe.load_lora_weights(tensors, adapter_name=adapter)
        if not any(adapter in names for names in pipe.get_list_adapters().values()):
            raise ValueError("none of its layers is in this model")
    except Exception as error:
        if any(adapter in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(adapter)
        reason = lora_error_reason(error)
        raise ImagineError(f"lora {name!r} does not fit this model ({model.family.label}): {reason}") from error
    log.info("loaded lora %s", name)
    model.loras[key] = adapter
    model.lora_hashes[adapter] = lora_short_hash(path, metadata)
    return adapter


def lora_short_hash(path: Path, metadata: dict) -> str:
    """AUTOMATIC1111's short hash of a LoRA file, for the `Lora hashes` of a picture's parameters: the file's own
    `sshs_model_hash` where it has one, else the sha256 of what follows a .safetensors header (kohya's addnet hash;
    of the whole file for others), 12 hex digits. Once per load: 0.05-0.15 s for a 69 MB file."""
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:12]
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if path.suffix == ".safetensors":
            file.seek(8 + int.from_bytes(file.read(8), "little"))
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_error_reason(error: Exception) -> str:
    """Why diffusers could not load a LoRA, in words for the client (its own message lists every layer)."""
    message = str(error)
    if "size mismatch" in message:
        return "its layers have other sizes than this model's"
    if "not found in the base model" in message or "none of its layers" in message:
        return "none of its layers is in this model"
    return message.strip().splitlines()[0][:200] if message.strip() else type(error).__name__


def use_loras(settings: Settings, model: LoadedModel, loras: list) -> dict:
    """Switches the model's adapters to exactly the request's LoRAs at their weights (none: all off), and returns
    their short hashes by name for the picture's parameters."""
    adapters = [(load_lora(settings, model, name), weight) for name, weight in loras]
    active = [(adapter, weight) for adapter, weight in adapters if weight != 0]
    pipe = model.txt2img
    if not active:
        if model.loras:
            pipe.disable_lora()
    else:
        pipe.enable_lora()
        names, weights = zip(*active, strict=True)
        pipe.set_adapters(list(names), list(weights))
    return {name: model.lora_hashes[adapter] for (name, _), (adapter, _) in zip(loras, adapters, strict=True)}


def embedding_vectors(name: str, path: Path, model: LoadedModel) -> dict:
    """An embedding file's vectors for each of the model's text encoders ('clip_l', and 'clip_g' for SDXL),
    in the layouts AUTOMATIC1111 reads: `emb_params`, `string_to_param`, a single tensor, or clip_l/clip_g."""
    tensors, _ = read_tensors(path, f"embedding {name!r}")
    pipe = model.txt2img
    encoders = {"clip_l": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders["clip_g"] = pipe.text_encoder_2
    if "clip_g" in tensors and len(encoders) == 1:
        raise ImagineError(f"embedding {name!r} is for SDXL; the model is {model.family.label}")
    if "string_to_param" in tensors:
        tensors = tensors["string_to_param"]
    if len(encoders) == 1 and "clip_l" not in tensors:
        single = [value for value in tensors.values() if isinstance(value, torch.Tensor)]
        tensors = {"clip_l": single[0]} if len(single) == 1 else {}
    vectors = {}
    for key, encoder in encoders.items():
        vector = tensors.get(key)
        width = encoder.get_input_embeddings().embedding_dim
        if not isinstance(vector, torch.Tensor) or vector.shape[-1] != width:
            raise ImagineError(f"embedding {name!r} does not fit this model ({model.family.label})")
        vectors[key] = vector.reshape(-1, width).to(encoder.device, encoder.dtype)
    return vectors


def prompt_embedding_vectors(settings: Settings, model: LoadedModel, *texts: str) -> dict:
    """The vectors of every embedding whose name the texts use as a word, each file read once per model."""
    files = {name.lower(): path for name, path in list_files(settings, "embeddings", EMBEDDING_SUFFIXES).items()}
    used = {}
    for name, path in files.items():
        if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.I) for text in texts):
            if name not in model.embeddings:
                model.embeddings[name] = embedding_vectors(name, path, model)
            used[name] = model.embeddings[name]
    return used


# ---------------------------------------------------------------------------------------------
# Generation: one picture from a loaded model; knows nothing of HTTP
# ---------------------------------------------------------------------------------------------


def scheduler_for(model: LoadedModel, sampler: str, seed: int | list, prediction: str | None = None):
    """The model's scheduler for `sampler` (and a `prediction` override, if any), built on first use
    and kept (building dpm2's takes 85 ms). `seed` is the picture's, or a list with each picture's of a batch.

    Reuse is safe: the pipeline's set_timesteps resets a scheduler's per-run state at the start of
    every run, and generations run one at a time.
    """
    scheduler = model.schedulers.get((sampler, prediction))
    if scheduler is None:
        config = model.scheduler_config
        if prediction is not None:
            config = {**config, "prediction_type": PREDICTIONS[prediction]}
        scheduler = keep_predictions(make_scheduler(sampler, config, seed))
        model.schedulers[(sampler, prediction)] = scheduler
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = seed  # each run draws its Brownian noise afresh from this seed
    scheduler.predicted = None
    return scheduler


def generate(model: LoadedModel, req: GenerationRequest, on_step=None, conditioning: dict | None = None) -> list:
    """Runs the diffusers pipeline once for `req` (whose seed, width and height must be set) on the
    encoded prompt `conditioning` (see prompt_embeddings; None: the request's prompts, no embeddings),
    and returns its `req.n` pictures, drawn together from the seeds seed, seed+1, ...

    `on_step(step, steps, latents)` is called after each denoising step with the latents a preview
    should show, one per picture: the predicted finished latents where the sampler gives them, else the
    current ones; if it returns True, the remaining steps are skipped and the pictures as far as they got are
    returned. `steps` counts model evaluations, so second-order samplers (heun, dpm2) report about twice
    `num_steps`.
    """
    if req.mask is not None or model.family.unet_channels == 9:
        return inpaint(model, req, on_step, conditioning)
    pipe = model.img2img if req.img is not None else model.txt2img
    size_args = (
        {"image": req.img.resize((req.width, req.height), Image.Resampling.LANCZOS), "strength": req.strength}
        if req.img is not None
        else {"width": req.width, "height": req.height}
    )
    return call_pipeline(model, pipe, req, on_step, conditioning, **size_args)


def call_pipeline(model: LoadedModel, pipe, req: GenerationRequest, on_step, conditioning, **inputs) -> list:
    """One pipeline call for the `req.n` pictures of `req` with the sampler, seeds, encoded prompt and step callback
    set; `inputs` are the picture's."""
    # One seed and generator per picture: the pipeline draws each picture's noise from its own, so picture k is
    # the picture that seed+k alone draws. A CPU generator gives the same noise for a seed on every device.
    seeds = [req.seed + index for index in range(req.n)]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    one_or_all = (lambda each: each[0]) if req.n == 1 else (lambda each: each)  # diffusers' form for one picture
    pipe.scheduler = scheduler = scheduler_for(model, req.sampler, one_or_all(seeds), req.prediction)

    def step_end(pipeline, index, timestep, tensors):
        if on_step is not None:
            latents = tensors["latents"] if scheduler.predicted is None else scheduler.predicted
            if on_step(index + 1, pipeline.num_timesteps, latents):
                pipeline._interrupt = True  # skips the remaining steps; the latents so far are decoded
        return tensors

    with torch.inference_mode():
        if conditioning is None:
            conditioning = prompt_embeddings(pipe, req.prompt, req.neg, req.clip_skip, {})
        return pipe(
            **conditioning,
            num_inference_steps=req.num_steps,
            guidance_scale=req.guidance,
            generator=one_or_all(generators),
            num_images_per_prompt=req.n,
            callback_on_step_end=step_end,
            **inputs,
        ).images


def inpaint(model: LoadedModel, req: GenerationRequest, on_step=None, conditioning=None) -> list:
    """Repaints the white part of `req.mask` (as AUTOMATIC1111 does), or with an inpainting checkpoint and no mask,
    the whole picture: txt2img from noise, img2img from `req.img`.

    The mask is blurred by `mask_blur` pixels; with `inpaint_area` "masked" only its bounding box plus
    `inpaint_padding` is generated, at the request's size, for full detail on a small part of a big picture.
    The result is pasted back through the blurred mask after decoding, so every pixel outside it is the input's.
    """
    size = (req.width, req.height)

    def paint(image, mask, strength=req.strength):
        image, mask = image.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.LANCZOS)
        # A copy of the picture for each of the batch: the pipeline encodes one picture with the first picture's
        # generator only, and each copy makes every picture's draw the one its single request makes.
        inputs = {"image": [image] * req.n, "mask_image": [mask] * req.n, "strength": strength}
        return call_pipeline(
            model, model.inpaint, req, on_step, conditioning, width=req.width, height=req.height, **inputs
        )

    if req.img is None:  # an inpainting checkpoint's txt2img: all repainted, nothing of the (blank) picture kept
        return paint(Image.new("RGB", size, (127, 127, 127)), Image.new("L", size, 255), strength=1.0)
    if req.mask is None:  # an inpainting checkpoint's img2img: the whole picture may change
        return paint(req.img, Image.new("L", req.img.size, 255))
    mask = req.mask.filter(ImageFilter.GaussianBlur(req.mask_blur)) if req.mask_blur else req.mask
    if req.inpaint_area == "masked":
        box = crop_box(mask, req.inpaint_padding, size)
        image, crop_mask = req.img.crop(box), mask.crop(box)
        return [pasted(req.img, painted, box, crop_mask) for painted in paint(image, crop_mask)]
    image, mask = req.img.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.LANCZOS)
    return [Image.composite(painted, image, mask) for painted in paint(image, mask)]


def pasted(picture: Image.Image, painted: Image.Image, box: tuple, mask: Image.Image) -> Image.Image:
    """`picture` with `painted` scaled into `box` through `mask` (the box's part of the blurred mask)."""
    result = picture.copy()
    result.paste(painted.resize(mask.size, Image.Resampling.LANCZOS), box[:2], mask)
    return result


def crop_box(mask: Image.Image, padding: int, size: tuple) -> tuple:
    """A1111's "only masked" region: the mask's bounding box plus `padding`, widened to the aspect ratio of
    `size` (the size it is generated at) as far as the picture allows, so it is not stretched."""
    left, top, right, bottom = mask.getbbox()
    width, height = mask.size
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, width), min(bottom + padding, height)
    ratio = size[0] / size[1]
    if (right - left) / (bottom - top) < ratio:
        left, right = _widen(left, right, round((bottom - top) * ratio), width)
    else:
        top, bottom = _widen(top, bottom, round((right - left) / ratio), height)
    return left, top, right, bottom


def _widen(low: int, high: int, length: int, limit: int) -> tuple:
    """[low, high) grown evenly on both sides to `length`, shifted to stay within [0, limit)."""
    low = max(0, low - (length - (high - low)) // 2)
    high = min(limit, low + length)
    return max(0, high - length), high


def preview_image(model: LoadedModel, req: GenerationRequest, latents: torch.Tensor) -> Image.Image:
    if req.preview == "full":
        return vae_preview(model.txt2img.vae, latents)
    return latents_to_preview(latents, model.family.latent_rgb, (req.width, req.height))


# ---------------------------------------------------------------------------------------------
# The engine: a queue of jobs, run one at a time on one thread
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Started:
    """The model is loaded and the generation has begun."""


@dataclasses.dataclass
class Progress:
    """A denoising step is done (every step; previews come only every `stream` steps)."""

    step: int
    steps: int


@dataclasses.dataclass
class Preview:
    step: int
    steps: int
    image: Image.Image
    index: int = 0  # which picture of a batch


@dataclasses.dataclass
class Finished:
    image: Image.Image
    parameters: str  # the settings, as stored in the PNG (see generation_parameters)
    seed: int
    model: str
    steps: int
    seconds: float
    pictures: list = dataclasses.field(default_factory=list)  # every picture of the batch as (image, parameters)
    seeds: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Failed:
    error: ImagineError


class Cancelled(Exception):
    """Raised from the step callback or a cancel point inside a step (add_cancel_points) to stop a generation."""


class Job:
    """One accepted request; the engine reports its progress as events the caller iterates over."""

    def __init__(self, request: GenerationRequest, model_key: str, client_gone=None):
        self.request = request
        self.model_key = model_key
        self.events = queue.Queue()
        self.client_gone = client_gone  # a callable saying the client has left, where the server can tell
        self.cancel_reason = None
        # Where it stands, for a progress report that is built only when asked (GET /sdapi/v1/progress).
        self.started = None  # time.time() when its generation began
        self.step, self.steps = 0, 0
        self.latents = None  # the latest latents a preview shows (one per picture), with the model that draws them
        self.model = None
        self.stop_early = None  # how it was asked to finish early: "interrupt" or "skip"

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def cancel(self, reason: ImagineError) -> None:
        """Stops the job before its next step, or before it starts; `reason` is what its client is told."""
        self.cancel_reason = reason

    def finish_early(self, how: str) -> None:
        """Ends the pictures at their next step, keeping them as far as they got (AUTOMATIC1111's interrupt and
        skip, which are one here: a batch is drawn in one call, and A1111's skip ends the call being drawn)."""
        self.stop_early = how

    def cancelled(self) -> bool:
        if self.cancel_reason is None and self.client_gone is not None and self.client_gone():
            self.cancel_reason = ImagineError("the client disconnected", 499)
        return self.cancel_reason is not None


class Engine:
    """Owns the models and runs every generation, one at a time, on one long-lived thread.

    One at a time because a device runs one generation well and two badly. One long-lived thread
    because the same diffusers call measured 1.17x slower on a freshly started thread than on the
    process's main thread (2-core CPU, SD1.5 at 256x256), and a prototype that started a thread per
    request measured 1.45x; main() therefore runs the engine on the main thread.
    """

    def __init__(self, settings: Settings, configs_dir: Path = CONFIGS_DIR):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.fp_prec, self.device)
        self.models = Models(settings, self.device, self.dtype, configs_dir)
        self.jobs = queue.Queue()
        self.accepting = threading.Lock()  # makes "is there room?" and "queue it" one step
        self.stopping = False
        self.running = None  # the job generating now
        self.unfinished = 0  # jobs accepted and not yet done: the running one and those waiting
        self.last_seconds = 1.0  # how long the last generation took, for Retry-After

    def submit(self, req: GenerationRequest, client_gone=None) -> Job:
        """Queues a request; an unknown model, a full queue or a stopping server is refused here, before any work."""
        job = Job(req, self.models.resolve(req.model), client_gone)
        for name, _ in req.loras:  # an unknown LoRA is refused before the request waits in the queue
            find_file(self.settings, "loras", "lora", name, LORA_SUFFIXES)
        if req.seed is None:
            job.request = dataclasses.replace(req, seed=secrets.randbelow(MAX_SEED + 1))
        with self.accepting:
            if self.stopping:
                raise ImagineError("the server is shutting down", 503)
            if self.unfinished > self.settings.max_queue:  # one runs and max_queue wait: no room
                raise self.busy()
            self.unfinished += 1
            self.jobs.put(job)
        return job

    def load_model(self, name: str) -> Job:
        """Queues the loading of a model, as a generation of no pictures: its first event says it is loaded."""
        return self.submit(GenerationRequest(prompt="", model=name, n=0))

    def busy(self) -> ImagineError:
        """The 503 for a request that finds no room."""
        # Every waiting job and the running one are ahead: a rough but honest estimate.
        retry_after = max(1, math.ceil(self.last_seconds * max(self.unfinished, 1)))
        waiting = max(self.unfinished - 1, 0)
        return ImagineError(f"the server is busy: {waiting} requests are waiting; try again", 503, retry_after)

    def run_forever(self) -> None:
        """Runs jobs until stop() is called."""
        while (job := self.next_job()) is not None:
            try:
                self.run(job)
            finally:
                with self.accepting:
                    self.unfinished -= 1

    def next_job(self) -> Job | None:
        """Waits for the next job (None: stop) in slices of a second. The kernel may hand a signal for the process
        (SIGTERM) to any of its threads, and Python runs its handler only once the main thread runs; a wait without
        end would leave main()'s SIGTERM unheard until the next request came."""
        while True:
            with contextlib.suppress(queue.Empty):
                return self.jobs.get(timeout=1)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="imagine-engine", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Cancels the running job and every waiting one, telling their clients, then ends run_forever."""
        shutting_down = ImagineError("the server is shutting down", 503)
        with self.accepting:
            self.stopping = True
            if self.running is not None:
                self.running.cancel(shutting_down)
            while not self.jobs.empty():
                self.jobs.get_nowait().events.put(Failed(shutting_down))
            self.jobs.put(None)

    def run(self, job: Job) -> None:
        if job.cancelled():  # its client left while it waited
            log.info("dropped a request: %s", job.cancel_reason.message)
            job.events.put(Failed(job.cancel_reason))
            return
        req = job.request
        started = time.perf_counter()
        self.running = job
        model, last_step = None, 0  # both read below, also when the prompt's encoding is cancelled
        try:
            model = self.models.get(job.model_key)
            if req.n == 0:  # only load the model (see load_model)
                job.events.put(Started())
                return
            model.cancelled = job.cancelled  # what the cancel points inside every layer ask, from the encoding on
            size = min(model.family.default_size, self.settings.max_size)  # for sizes the request left out
            req = job.request = dataclasses.replace(req, width=req.width or size, height=req.height or size)
            log.info(
                "generating %d x %dx%d, %d steps, %s, seed %d, model %s",
                req.n, req.width, req.height, req.num_steps, req.sampler, req.seed, model.name,
            )  # fmt: skip
            lora_hashes = use_loras(self.settings, model, req.loras)
            prompt, neg = without_lora_tags(req.prompt), without_lora_tags(req.neg)
            embeddings = prompt_embedding_vectors(self.settings, model, prompt, neg)
            with torch.inference_mode():
                conditioning = prompt_embeddings(model.txt2img, prompt, neg, req.clip_skip, embeddings)
            job.events.put(Started())
            job.started, job.model = time.time(), model
            # A batch is one pipeline call, on CPUs too: there 2 pictures at 512x512 took 65 s together against
            # 70 s one by one (README, Performance: Batches), in the same peak memory.
            each = [dataclasses.replace(req, seed=req.seed + index, n=1) for index in range(req.n)]

            def on_step(step, steps, latents):
                nonlocal last_step
                if job.cancelled():
                    raise Cancelled
                last_step = step
                job.step, job.steps, job.latents = step, steps, latents
                job.events.put(Progress(step, steps))
                if req.stream and step % req.stream == 0 and step < steps:
                    for index, picture in enumerate(each):
                        preview = preview_image(model, picture, latents[index : index + 1])
                        job.events.put(Preview(step, steps, preview, index))
                return job.stop_early is not None

            images = generate(model, req, on_step, conditioning)
            pictures = [
                (image, generation_parameters(picture, model.name, lora_hashes))
                for image, picture in zip(images, each, strict=True)
            ]
        except Cancelled:
            log.info("stopped after step %d: %s", last_step, job.cancel_reason.message)
            job.events.put(Failed(job.cancel_reason))
            return
        except ImagineError as error:
            job.events.put(Failed(error))
            return
        except torch.OutOfMemoryError:
            # As ComfyUI does: give the memory back by unloading every model; the next request reloads one.
            log.exception("out of memory; unloading every model")
            for key in list(self.models.loaded):
                self.models.unload(key)
            job.events.put(Failed(ImagineError("the device ran out of memory; try a smaller picture", 500)))
            return
        except Exception as error:  # the server must outlive any failure inside a generation
            log.exception("generation failed")
            job.events.put(Failed(ImagineError(f"generation failed: {type(error).__name__}: {error}", 500)))
            return
        finally:
            self.running = None
            if model is not None:
                model.cancelled = None
        seconds = time.perf_counter() - started
        self.last_seconds = seconds
        log.info("generated in %.1f s (seed %d)", seconds, req.seed)
        seeds = [req.seed + index for index in range(len(pictures))]
        image, parameters = pictures[0]
        job.events.put(Finished(image, parameters, req.seed, model.name, last_step, round(seconds, 3), pictures, seeds))


# ---------------------------------------------------------------------------------------------
# HTTP: POST /generate, GET /samplers, and JSON errors for everything else
# ---------------------------------------------------------------------------------------------


def finished_fields(event: Finished) -> dict:
    images = [png_base64(image, parameters) for image, parameters in event.pictures]
    return {
        "img": images[0],
        "images": images,
        "seeds": event.seeds,
        "seed": event.seed,
        "model": event.model,
        "width": event.image.width,
        "height": event.image.height,
        "steps": event.steps,
        "seconds": event.seconds,
    }


def ndjson(fields: dict) -> str:
    return json.dumps(fields) + "\n"


def stream_lines(job: Job, events):
    """The NDJSON body: a preview line every `stream` steps, then the finished picture or the error.

    The server closes this generator when the client leaves; the job then stops before its next step.
    """
    seed = job.request.seed
    try:
        for event in events:
            if isinstance(event, Preview):
                # Previews favour speed: the lowest PNG compression, still lossless.
                preview = png_base64(event.image, compress_level=1)
                step = {"step": event.step, "steps": event.steps, "index": event.index}
                yield ndjson({"img": preview, **step, "seed": seed + event.index, "done": False})
            elif isinstance(event, Finished):
                yield ndjson({**finished_fields(event), "done": True})
            elif isinstance(event, Failed):
                yield ndjson({"error": event.error.message, "done": True})
    except Exception:  # the status line is sent: a failure can only be told as the stream's last line
        log.exception("the stream failed")
        yield ndjson({"error": "internal error; the server log has the details", "done": True})
    finally:
        job.cancel(ImagineError("the client disconnected", 499))


def release_after(chunks, release):
    """A body's chunks, then `release()`: once all are sent, or once the server gives up on the client."""
    try:
        yield from chunks
    finally:
        release()


def read_json_body() -> dict:
    if not request.is_json:
        raise ImagineError("send a JSON body with Content-Type: application/json", 415)
    body = parse_json(request.get_data(cache=False))
    if not isinstance(body, dict):
        raise ImagineError('the body must be a JSON object, e.g. {"prompt": "a cat"}')
    return body


def parse_json(raw: bytes):
    """The parsed body, or None if it is not JSON; one that would cost too much to parse is refused unparsed."""
    marks = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    if marks > MAX_JSON_MARKS:
        raise ImagineError(f"the body has {marks} brackets and commas; at most {MAX_JSON_MARKS} are accepted")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ImagineError("the body's JSON is nested too deeply") from None
    except ValueError:  # not JSON, or not UTF-8
        return None


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """'localhost:5000' -> 'localhost', '[::1]:5000' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if ":" in host_header else host_header


def check_who_is_calling(settings: Settings, needs_key: bool = True) -> None:
    """Refuses, before any work, requests this server was not opened up to (see the README's Security section)."""
    # DNS rebinding: a web page can make a browser send its requests to 127.0.0.1 under the page's own
    # host name. A server listening on loopback only ever has a local name; anything else is such a page.
    # The raw header: werkzeug's request.host reads a name it finds invalid ("a_b.evil.com") as empty.
    host = host_name(request.headers.get("Host", "").strip().lower())
    if is_loopback(settings.host) and host and host not in LOCAL_HOSTS and not host.endswith(".localhost"):
        raise ImagineError(f"Host {host!r} is not a local name; this server listens on {settings.host} only", 403)
    # A browser tells every cross-site request's origin; only the origins the user listed may call.
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(settings, origin) and not is_same_origin(origin):
        raise ImagineError(f"origin {origin!r} is not allowed; list it in --cors-origins (IMAGINE_CORS_ORIGINS)", 403)
    # Browsers send no credentials with a CORS preflight, so it is answered before the key is checked.
    if request.method == "OPTIONS" and origin is not None:
        return
    if settings.api_key and needs_key:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # WSGI hands headers over as Latin-1 text: encoding them back gives the bytes the client sent, which
        # for a non-ASCII key are its UTF-8 (what curl and every HTTP library send).
        sent, key = given.strip().encode("latin-1"), settings.api_key.encode("utf-8", "surrogateescape")
        if scheme.lower() == "basic":  # AUTOMATIC1111's clients send --api-auth's user:password: any user, the key
            sent = basic_password(sent)
        elif scheme.lower() != "bearer":
            sent = b""
        # compare_digest takes as long for a near miss as for a wild guess: the key cannot be found byte by byte.
        if not sent or not hmac.compare_digest(sent, key):
            raise ImagineError("this server needs an API key: send 'Authorization: Bearer <key>'", 401)


def basic_password(credentials: bytes) -> bytes:
    """The password of HTTP Basic credentials (base64 of user:password), or b"" if they are none."""
    try:
        return base64.b64decode(credentials, validate=True).partition(b":")[2]
    except (binascii.Error, ValueError):
        return b""


def origin_allowed(settings: Settings, origin: str) -> bool:
    return "*" in settings.cors_origins or origin.rstrip("/") in settings.cors_origins


def is_same_origin(origin: str) -> bool:
    """The web page's own requests: a browser sends Origin with a same-origin POST, and it names this server's
    address as the Host header does (already checked to be a local name on a loopback server)."""
    return origin.rstrip("/").lower() == f"{request.scheme}://{request.headers.get('Host', '').strip().lower()}"


ENDPOINTS = {
    "name": "Imagine, a local Stable Diffusion server",
    "endpoints": {
        "POST /generate": 'a picture: JSON in (only "prompt" is required), a base64 PNG out',
        "GET /samplers": "the sampler names /generate accepts",
        "GET /models": "the models in the models folders, with their family and whether they are loaded",
        "GET /health": "whether the server is up, its device, loaded models and queue, for load balancers",
        "GET /loras": "the LoRAs in the loras/ sub-folders, for <lora:name:weight> in a prompt or the loras field",
        "GET /embeddings": "the textual inversions in the embeddings/ sub-folders, used by writing their name",
        "POST /v1/images/generations": "OpenAI's Images API: a picture from a prompt, as the openai SDK asks",
        "POST /v1/images/edits": "OpenAI's Images API: a picture edited (multipart), with a mask for inpainting",
        "GET /v1/images/files/<name>": "a picture answered as a link (response_format url), kept for an hour",
        "GET /v1/models": "OpenAI's model list: the models /v1/images/* accept",
        "POST /sdapi/v1/txt2img": "AUTOMATIC1111's txt2img, for its clients (README: Use it from other programs)",
        "POST /sdapi/v1/img2img": "AUTOMATIC1111's img2img and inpainting (init_images, mask)",
        "GET /sdapi/v1/sd-models": "the models, titled as AUTOMATIC1111 does (name.safetensors [hash])",
        "GET /sdapi/v1/options": "the current model (sd_model_checkpoint) and a few settings",
        "POST /sdapi/v1/options": "sd_model_checkpoint switches the default model, answering once it is loaded",
        "GET /sdapi/v1/progress": "the running generation's progress and latest preview",
        "POST /sdapi/v1/interrupt": "ends the running generation now with the picture as far as it got",
        "POST /sdapi/v1/skip": "ends the picture being drawn now; the batch goes on",
        "GET /sdapi/v1/samplers": "AUTOMATIC1111's sampler names that Imagine draws with",
        "GET /sdapi/v1/schedulers": "Automatic and Karras",
        "GET /sdapi/v1/loras": "the LoRAs, as AUTOMATIC1111 lists them",
        "GET /sdapi/v1/embeddings": "the textual inversions, as AUTOMATIC1111 lists them",
        "GET /sdapi/v1/upscalers": "None: Imagine has no upscalers",
        "GET /sdapi/v1/sd-vae": "empty: the models' own VAEs are used",
        "GET /sdapi/v1/latent-upscale-modes": "empty",
        "GET /sdapi/v1/face-restorers": "empty",
        "GET /sdapi/v1/prompt-styles": "empty",
        "GET /sdapi/v1/hypernetworks": "empty",
        "GET /sdapi/v1/scripts": "none",
        "GET /sdapi/v1/cmd-flags": "the few server flags a client may know",
        "POST /sdapi/v1/png-info": "the generation parameters stored in a PNG",
        "GET /": "the web page for a browser (Accept: text/html), this list for anything else",
        "GET /web/<name>": "the web page's script and style",
    },
    "readme": "README.md beside imagine.py: every field, setting and example",
}


def error_fields(message: str, status: int) -> dict:
    """An error's JSON: Imagine's {"error": message}, or OpenAI's or AUTOMATIC1111's shape on their routes, which
    their clients read."""
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    if request.path.startswith("/sdapi/"):  # AUTOMATIC1111's clients read its errors' detail
        return {"error": message, "detail": message}
    return {"error": message}


# The page's files (flat in web/); anything else under /web/ is a 404, so no path reaches the disk from a URL.
WEB_FILES = ("index.html", "app.js", "style.css")

# On every answer: only this server's own script and style run, the page talks to this server only, and no
# other site may frame it (clickjacking) or have a browser guess a type from an answer's content.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def wants_html() -> bool:
    """A browser asks for text/html first; curl (*/*) and API clients (application/json) get the JSON."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def send_web_file(name: str) -> Response:
    return send_from_directory(WEB_DIR, name, max_age=0)


def log_access(response: Response) -> None:
    """One line per request, so that the service's journal tells what happened: who asked for what, the
    status, and for a refusal or failure why. Never the body or the key; every value escaped onto one line."""
    status = response.status_code
    reason = ""
    if status >= 400 and response.is_json:
        error = (response.get_json(silent=True) or {}).get("error", "")
        message = error.get("message", "") if isinstance(error, dict) else error  # OpenAI's shape on /v1/
        reason = " " + json.dumps(str(message), ensure_ascii=False)[:300]
    path = json.dumps(request.path, ensure_ascii=False)[1:-1][:300]
    level = logging.INFO if status < 400 else logging.WARNING
    log.log(level, '%s "%s %s" %d%s', request.remote_addr, request.method, path, status, reason)


def create_app(engine: Engine) -> Flask:
    app = Flask("imagine")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # larger bodies get 413 before they are read
    settings = engine.settings

    @app.before_request
    def who_is_calling():
        # The page and its files hold no secret: a browser must load them to ask for the key at all.
        check_who_is_calling(settings, needs_key=request.endpoint not in ("index_route", "web_file_route"))
        if request.method == "OPTIONS" and request.headers.get("Origin") is not None:
            return preflight_answer()

    def preflight_answer():
        return Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type, Authorization",
                "Access-Control-Max-Age": "600",
            },
        )

    @app.after_request
    def allow_listed_origin(response):
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(settings, origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    @app.after_request
    def security_headers(response):
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.after_request
    def log_request(response):
        log_access(response)
        return response

    @app.errorhandler(ImagineError)
    def imagine_error(error):
        response = jsonify(error_fields(error.message, error.status))
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response, error.status

    @app.errorhandler(HTTPException)
    def http_error(error):
        response = error.get_response()  # keeps headers such as a 405's Allow
        response.set_data(json.dumps(error_fields(error.description, error.code)))
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error):
        log.exception("unexpected error")
        return jsonify(error_fields("internal error; the server log has the details", 500)), 500

    # One slot for each request the engine may hold (running or waiting). A stream keeps its slot until the
    # client has read it or is dropped (SEND_TIMEOUT), so clients that stop reading cannot take the threads
    # that answer everything else: a request past the slots gets its 503 from those. (A single answer is
    # handed to waitress whole, and a thread waits on its reader only past 4 MB unsent, up to SEND_TIMEOUT.)
    generation_slots = threading.BoundedSemaphore(settings.max_queue + 1)

    def in_generation_slot(answer) -> Response:
        """`answer()`'s response, made while holding a slot, which a stream keeps until it is sent."""
        if not generation_slots.acquire(blocking=False):
            raise engine.busy()
        try:
            response = answer()
        except BaseException:
            generation_slots.release()
            raise
        if response.is_streamed:
            response.response = release_after(response.response, generation_slots.release)
        else:
            generation_slots.release()
        return response

    @app.post("/generate")
    def generate_route():
        return in_generation_slot(generate_answer)

    def generate_answer() -> Response:
        # waitress can tell whether the client is still there (with channel_request_lookahead, see main()).
        client_gone = request.environ.get("waitress.client_disconnected")
        body = read_json_body()
        job = engine.submit(parse_request(body, engine.settings.max_size, engine.settings.max_batch), client_gone)
        events = iter(job)
        # Wait until the model is loaded (Started) or failed to load, while the status is still ours to set.
        first = next(events)
        if isinstance(first, Failed):
            raise first.error
        if job.request.stream:
            return Response(stream_lines(job, events), mimetype="application/x-ndjson")
        for event in events:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return jsonify(finished_fields(event))

    @app.get("/samplers")
    def samplers_route():
        return jsonify(samplers=list(SAMPLERS), default=DEFAULT_SAMPLER)

    @app.get("/")
    def index_route():
        """What someone who opens the server's address finds: the web page in a browser; for an API client,
        what the server answers and where it is explained."""
        response = jsonify(ENDPOINTS) if settings.no_web or not wants_html() else send_web_file("index.html")
        response.vary.add("Accept")  # one address, two answers: caches must keep them apart
        return response

    @app.get("/web/<name>")
    def web_file_route(name):
        if settings.no_web or name not in WEB_FILES:
            raise ImagineError(f"no such file: {name!r}", 404)
        return send_web_file(name)

    @app.get("/models")
    def models_route():
        return jsonify(models=engine.models.listing(), default=settings.model)

    @app.get("/health")
    def health_route():
        # For load balancers: it reads a few fields and never waits for the engine, so it answers mid-generation.
        loaded = [model.name for model in list(engine.models.loaded.values())]
        running = engine.running is not None
        return jsonify(
            status="ok", device=str(engine.device), loaded=loaded, queue=engine.jobs.qsize(), running=running
        )

    @app.get("/loras")
    def loras_route():
        return jsonify(loras=lora_listing(settings))

    @app.get("/embeddings")
    def embeddings_route():
        files = list_files(settings, "embeddings", EMBEDDING_SUFFIXES)
        return jsonify(embeddings=[{"name": name, "size": path.stat().st_size} for name, path in files.items()])

    add_openai_routes(app, engine, in_generation_slot)
    add_a1111_routes(app, engine, generation_slots)
    return app


# ---------------------------------------------------------------------------------------------
# OpenAI's Images API: /v1/images/generations, /v1/images/edits, /v1/models, for the openai SDK,
# Open WebUI and LibreChat. A translator only: its bodies become /generate bodies for parse_request,
# and the engine's events become OpenAI's answers.
# ---------------------------------------------------------------------------------------------

# OpenAI's quality names as steps: low is a quick draft, high takes about twice the default's time.
OPENAI_QUALITY_STEPS = {"low": 12, "medium": 25, "standard": 25, "auto": 25, "high": 40, "hd": 40}
OPENAI_OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
OPENAI_RESPONSE_FORMATS = ("b64_json", "url")
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit
# Imagine's own knobs, sent as extra fields (the SDK's extra_body), and their /generate names.
OPENAI_KNOBS = {
    "negative_prompt": "neg",
    "seed": "seed",
    "steps": "num_steps",
    "guidance": "guidance",
    "sampler": "sampler",
    "loras": "loras",
    "clip_skip": "clip_skip",
    "strength": "strength",
}
# OpenAI's fields with no meaning here: accepted, so that clients which always send them work.
OPENAI_IGNORED = ("moderation", "style", "user", "input_fidelity")
OPENAI_FIELDS = {
    "prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
    "background", "stream", "partial_images", *OPENAI_IGNORED, *OPENAI_KNOBS,
}  # fmt: skip
# Multipart parts are text: these are read as the numbers and booleans the JSON route gets.
OPENAI_FORM_INTEGERS = ("n", "output_compression", "partial_images", "seed", "steps", "clip_skip")
OPENAI_FORM_NUMBERS = ("guidance", "strength")
# OpenAI bills by tokens; the SDK's types want the fields, and nothing is billed here.
OPENAI_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
LINKED_PICTURES_KEPT = 64  # pictures answered as links, the newest kept: a few hundred MB at most
LINKED_PICTURE_SECONDS = 3600


@dataclasses.dataclass
class OpenAIOptions:
    """What an OpenAI request asks of the answer rather than of the picture."""

    size: str = "auto"
    quality: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    stream: bool = False
    partial_images: int = 0


def openai_size(size: str, max_size: int) -> dict:
    """`auto` (the family's default, or the input picture's size) or `WxH`, as /generate's width and height."""
    if size == "auto":
        return {}
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if match is None:
        raise ImagineError(f"size must be 'auto' or WIDTHxHEIGHT such as '512x512', not {size!r}")
    dimensions = {"width": int(match[1]), "height": int(match[2])}
    try:
        for field in dimensions:
            _size(dimensions, field, None, max_size)
    except ImagineError as error:
        raise ImagineError(f"size {size!r}: {error.message}") from None
    return dimensions


def openai_options(body: dict) -> OpenAIOptions:
    options = OpenAIOptions(
        size=_text(body, "size", "auto"),
        quality=_text(body, "quality", "auto"),
        response_format=_text(body, "response_format", "b64_json"),
        output_format=_text(body, "output_format", "png"),
        output_compression=_integer(body, "output_compression", 100, 0, 100),
        partial_images=_integer(body, "partial_images", 0, 0, MAX_PARTIAL_IMAGES),
    )
    if options.quality not in OPENAI_QUALITY_STEPS:
        raise ImagineError(f"quality must be one of: {', '.join(OPENAI_QUALITY_STEPS)}, not {options.quality!r}")
    if options.response_format not in OPENAI_RESPONSE_FORMATS:
        raise ImagineError(f"response_format must be 'b64_json' or 'url', not {options.response_format!r}")
    if options.output_format not in OPENAI_OUTPUT_FORMATS:
        raise ImagineError(f"output_format must be one of: png, jpeg, webp, not {options.output_format!r}")
    background = body.get("background")
    if background == "transparent":
        raise ImagineError("background 'transparent' is not supported: Stable Diffusion draws opaque pictures")
    if background not in (None, "auto", "opaque"):
        raise ImagineError(f"background must be 'auto' or 'opaque', not {json.dumps(background)[:80]}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ImagineError(f"stream must be true or false, not {json.dumps(stream)[:80]}")
    options.stream = stream
    return options


def openai_generate_body(body: dict, max_size: int) -> tuple:
    """An OpenAI request's /generate body (for parse_request, which checks it) and its answer options."""
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        raise ImagineError(f"unknown parameter {unknown[0]!r}; the parameters are: {', '.join(sorted(OPENAI_FIELDS))}")
    options = openai_options(body)
    generate_body = {OPENAI_KNOBS[knob]: body[knob] for knob in OPENAI_KNOBS if knob in body}
    generate_body.setdefault("num_steps", OPENAI_QUALITY_STEPS[options.quality])
    generate_body.update(openai_size(options.size, max_size), prompt=body.get("prompt"))
    if "n" in body:
        generate_body["n"] = body["n"]
    if options.stream and options.partial_images:
        generate_body["stream"] = 1  # a fast preview after every step; the partial images are picked from them
    return generate_body, options


def form_fields(form) -> dict:
    """A multipart form as the JSON body it stands for: numbers and booleans from their text, `loras` from
    JSON text or from the SDK's flattened `loras[][name]` / `loras[][weight]` parts. Text that is no number
    stays text, for parse_request to name."""
    body, loras = {}, []
    for key, value in form.items(multi=True):
        if key == "loras[][name]":
            loras.append({"name": value})
        elif key == "loras[][weight]" and loras:
            loras[-1]["weight"] = float(value) if re.fullmatch(r"-?\d+(\.\d+)?", value) else value
        elif key in OPENAI_FORM_INTEGERS and re.fullmatch(r"-?\d{1,20}", value):
            body[key] = int(value)
        elif key in OPENAI_FORM_NUMBERS and re.fullmatch(r"-?\d{1,20}(\.\d{1,20})?", value):
            body[key] = float(value)
        elif key == "stream" and value in ("true", "false"):
            body[key] = value == "true"
        elif key == "loras":  # JSON text; text that is no JSON stays, for lora_field to refuse
            parsed = parse_json(value.encode())
            body[key] = value if parsed is None else parsed
        else:
            body[key] = value
    if loras:
        body["loras"] = loras
    return body


def openai_mask(data: bytes, field: str = "mask") -> str:
    """OpenAI's mask (transparent pixels are repainted) as /generate's (white repaints), base64 PNG."""
    image = decode_image(base64.b64encode(data).decode("ascii"), field, "RGBA")
    repaint = image.getchannel("A").point(lambda alpha: 255 - alpha)
    if repaint.getbbox() is None:
        raise ImagineError("mask has no transparent pixels: they mark the part of the image to repaint")
    return png_base64(repaint)


def encode_picture(image: Image.Image, parameters: str | None, options: OpenAIOptions) -> bytes:
    """The picture in the asked format; a PNG keeps its settings, as /generate's do."""
    if options.output_format == "png":
        return png_bytes(image, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format=OPENAI_OUTPUT_FORMATS[options.output_format], quality=options.output_compression)
    return buffer.getvalue()


class LinkedPictures:
    """Pictures answered as links: in memory for an hour, the newest LINKED_PICTURES_KEPT, under names
    nobody can guess (the links are the only way to them)."""

    def __init__(self):
        self.pictures = collections.OrderedDict()  # name -> (expiry, data)
        self.lock = threading.Lock()

    def add(self, data: bytes, extension: str) -> str:
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        with self.lock:
            self.pictures[name] = (time.monotonic() + LINKED_PICTURE_SECONDS, data)
            while len(self.pictures) > LINKED_PICTURES_KEPT:
                self.pictures.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        with self.lock:
            expiry, data = self.pictures.get(name, (0, None))
            if expiry < time.monotonic():
                self.pictures.pop(name, None)
                return None
            return data


def openai_answer_fields(options: OpenAIOptions, width: int, height: int) -> dict:
    return {
        "size": f"{width}x{height}",
        "quality": options.quality,
        "background": "opaque",
        "output_format": options.output_format,
    }


def openai_stream(job: Job, events, options: OpenAIOptions, kind: str):
    """The event stream: up to `partial_images` previews per picture, spread evenly over its steps, then a
    completed event for each picture. The server closes this generator when the client leaves; the job then
    stops before its next step."""
    shown = collections.Counter()  # partial images sent, per picture of the batch
    req = job.request
    fields = openai_answer_fields(options, req.width, req.height)
    try:
        for event in events:
            created = int(time.time())
            if isinstance(event, Preview) and shown[event.index] < options.partial_images:
                # The k-th of p partial images comes at k/(p+1) of the steps.
                if event.step * (options.partial_images + 1) >= (shown[event.index] + 1) * event.steps:
                    data = base64.b64encode(encode_picture(event.image, None, options)).decode("ascii")
                    index = shown[event.index]
                    shown[event.index] += 1
                    yield server_event(f"{kind}.partial_image", b64_json=data, partial_image_index=index,
                                       created_at=created, **fields)  # fmt: skip
            elif isinstance(event, Finished):
                for image, parameters in event.pictures:
                    data = base64.b64encode(encode_picture(image, parameters, options)).decode("ascii")
                    yield server_event(f"{kind}.completed", b64_json=data, created_at=created, usage=OPENAI_USAGE,
                                       **fields)  # fmt: skip
            elif isinstance(event, Failed):
                yield server_event("error", error=error_shape(event.error.message, event.error.status))
    except Exception:  # the status line is sent: a failure can only be told as an event
        log.exception("the stream failed")
        yield server_event("error", error=error_shape("internal error; the server log has the details", 500))
    finally:
        job.cancel(ImagineError("the client disconnected", 499))


def error_shape(message: str, status: int) -> dict:
    return {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}


def server_event(kind: str, **fields) -> str:
    """One server-sent event; the SDK reads the type from the data, which is always JSON."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"


def add_openai_routes(app: Flask, engine: Engine, in_generation_slot) -> None:
    settings = engine.settings
    linked = LinkedPictures()
    fallen_back = set()  # model names logged as replaced by the default model

    def model_or_default(name):
        """The model asked for, or the default for names Imagine does not have: clients send dall-e-3 or gpt-image-1."""
        if name is None:
            return None
        try:
            engine.models.resolve(_text({"model": name}, "model", None))
            return name
        except ImagineError as error:
            if error.status != 404:
                raise
        if name not in fallen_back:
            fallen_back.add(name)
            log.info("OpenAI model %r is not here; the default model %r draws instead", name, settings.model)
        return None

    def answer(body: dict, kind: str, picture: dict) -> Response:
        """The answer to a generation (`picture` empty) or an edit (`picture` has /generate's img and mask)."""
        client_gone = request.environ.get("waitress.client_disconnected")
        generate_body, options = openai_generate_body(body, settings.max_size)
        generate_body.update(picture, model=model_or_default(body.get("model")))
        job = engine.submit(parse_request(generate_body, settings.max_size, settings.max_batch), client_gone)
        events = iter(job)
        first = next(events)  # the model is loaded, or failed to load, while the status is still ours to set
        if isinstance(first, Failed):
            raise first.error
        if options.stream:
            return Response(openai_stream(job, events, options, kind), mimetype="text/event-stream")
        for event in events:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return jsonify(openai_images(event, options))

    def openai_images(event: Finished, options: OpenAIOptions) -> dict:
        data = []
        for image, parameters in event.pictures:
            picture = encode_picture(image, parameters, options)
            if options.response_format == "url":
                name = linked.add(picture, options.output_format)
                data.append({"url": f"{request.host_url}v1/images/files/{name}", "revised_prompt": None})
            else:
                data.append({"b64_json": base64.b64encode(picture).decode("ascii"), "revised_prompt": None})
        fields = openai_answer_fields(options, event.image.width, event.image.height)
        return {"created": int(time.time()), "data": data, **fields, "usage": OPENAI_USAGE}

    @app.post("/v1/images/generations")
    def openai_generations_route():
        return in_generation_slot(lambda: answer(read_json_body(), "image_generation", {}))

    @app.post("/v1/images/edits")
    def openai_edits_route():
        return in_generation_slot(edit_answer)

    def edit_answer() -> Response:
        if request.mimetype != "multipart/form-data":
            raise ImagineError("send the edit as multipart/form-data, as the openai SDK does", 415)
        images = request.files.getlist("image") + request.files.getlist("image[]")
        if len(images) != 1:
            raise ImagineError(f"send one image; Imagine edits one picture at a time, not {len(images)}")
        picture = {"img": base64.b64encode(images[0].read()).decode("ascii")}
        decode_image(picture["img"], "image")  # refused here under the name the client sent
        if "mask" in request.files:
            picture["mask"] = openai_mask(request.files["mask"].read())
        return answer(form_fields(request.form), "image_edit", picture)

    @app.get("/v1/images/files/<name>")
    def openai_file_route(name):
        data = linked.get(name)
        if data is None:
            raise ImagineError(f"no picture {name!r}: links last an hour, for the newest {LINKED_PICTURES_KEPT}", 404)
        return Response(data, mimetype=f"image/{name.rpartition('.')[2]}")

    @app.get("/v1/models")
    def openai_models_route():
        names = dict.fromkeys([settings.model, *(model["name"] for model in engine.models.listing()), DEMO_MODEL])
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "imagine"} for name in names]
        return jsonify(object="list", data=models)


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111's API (/sdapi/v1/*): a translator to and from GenerationRequest, for the programs
# written for that server (Open WebUI, SillyTavern, LibreChat, webuiapi); README "Use it from other programs"
# ---------------------------------------------------------------------------------------------

A1111_VERSION = "imagine"  # `version` in info; A1111 writes its git tag there
# A1111's sampler names (GET /sdapi/v1/samplers, in its order) -> ours; A1111's "DPM++ 2S a" is our "dpm++ 2s".
A1111_SAMPLERS = {
    "DPM++ 2M": "dpm++ 2m",
    "DPM++ SDE": "dpm++ sde",
    "DPM++ 2M SDE": "dpm++ 2m sde",
    "DPM++ 2S a": "dpm++ 2s",
    "Euler a": "euler a",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM2 a": "dpm2 a",
    "DDIM": "ddim",
    "LCM": "lcm",
}
A1111_SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}  # name -> label; Karras as our "<sampler> karras"
A1111_SAMPLER = "Euler"  # what A1111 draws with when a request names no sampler
A1111_STRENGTH = 0.75  # A1111's default denoising_strength
# Our field -> A1111's, so that an error names the field the client sent.
A1111_FIELD_NAMES = {
    "neg": "negative_prompt",
    "num_steps": "steps",
    "guidance": "cfg_scale",
    "strength": "denoising_strength",
    "img": "init_images[0]",
    "inpaint_padding": "inpaint_full_res_padding",
    "n": "batch_size",
    "model": "override_settings.sd_model_checkpoint",
}
# Features of A1111 that Imagine lacks, and how a request switches each on: they are ignored, logged once,
# and named in info's imagine_ignored, so that a client sending its full form never fails.
A1111_UNSUPPORTED = {
    "enable_hr": lambda value: value is True,
    "restore_faces": lambda value: value is True,
    "tiling": lambda value: value is True,
    "script_name": lambda value: bool(value),
    "alwayson_scripts": lambda value: bool(value),
    "styles": lambda value: bool(value),
    "subseed_strength": lambda value: bool(value),
    "refiner_checkpoint": lambda value: bool(value),
}
A1111_LOGGED = set()  # the unsupported features already logged once


def a1111_sampler(body: dict) -> tuple:
    """(our sampler, A1111's sampler name, A1111's scheduler name) for sampler_name (or the older sampler_index)
    and scheduler; combined names such as "DPM++ 2M Karras" are split. An unknown name falls back to A1111's
    default, as A1111 does, so a client's list of names from another server still draws."""
    name = _text(body, "sampler_name", None) or _text(body, "sampler_index", None) or A1111_SAMPLER
    scheduler = (_text(body, "scheduler", None) or "automatic").lower()
    label, _, last = name.rpartition(" ")
    if label and last.lower() in A1111_SCHEDULERS:
        name, scheduler = label, last.lower()
    known = {known.lower(): known for known in A1111_SAMPLERS}
    name = known.get(name.lower(), A1111_SAMPLER)
    sampler = A1111_SAMPLERS[name]
    if scheduler == "karras" and f"{sampler} karras" in SAMPLERS:
        return f"{sampler} karras", name, "karras"
    return sampler, name, "automatic"


def a1111_overrides(body: dict) -> dict:
    overrides = body.get("override_settings")
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ImagineError(f"override_settings must be an object, not {json.dumps(overrides)[:80]}")
    return overrides


def a1111_mask(body: dict) -> str | None:
    """The img2img mask as our mask field takes it (white repaints): an RGBA mask whose alpha is used is read by its
    alpha, as A1111 does, and inpainting_mask_invert 1 swaps what is kept and what is repainted."""
    data = _text(body, "mask", None)
    invert = _integer(body, "inpainting_mask_invert", 0, 0, 1)
    if data is None:
        return None
    mask = decode_image(data, "mask", "RGBA")
    alpha = mask.getchannel("A")
    mask = alpha if alpha.getextrema() != (255, 255) else mask.convert("L")
    if invert:
        mask = Image.eval(mask, lambda value: 255 - value)
    return base64.b64encode(png_bytes(mask, compress_level=1)).decode()


def a1111_ignored(body: dict) -> list:
    ignored = [field for field, switched_on in A1111_UNSUPPORTED.items() if switched_on(body.get(field))]
    for field in ignored:
        if field not in A1111_LOGGED:
            A1111_LOGGED.add(field)
            log.warning("AUTOMATIC1111 API: %s is not supported and is ignored", field)
    return ignored


def a1111_request(body: dict, img2img: bool, models, settings: Settings) -> tuple:
    """An A1111 txt2img/img2img body as (GenerationRequest, what else the answer needs). Its fields become a
    /generate body that parse_request checks; an error names A1111's field."""
    try:
        overrides = a1111_overrides(body)
        sampler, sampler_name, scheduler = a1111_sampler(body)
        batch_size = _integer(body, "batch_size", 1, 1, settings.max_batch)
        n_iter = _integer(body, "n_iter", 1, 1, settings.max_batch)
        if batch_size * n_iter > settings.max_batch:
            raise ImagineError(f"batch_size x n_iter is {batch_size * n_iter}; at most {settings.max_batch} pictures")
        clip_skip = overrides.get("CLIP_stop_at_last_layers", body.get("clip_skip"))
        generate_body = {
            "prompt": body.get("prompt") or "",
            "neg": body.get("negative_prompt"),
            "width": body.get("width"),
            "height": body.get("height"),
            "num_steps": body.get("steps"),
            "guidance": body.get("cfg_scale"),
            "sampler": sampler,
            "seed": body.get("seed"),
            "n": batch_size * n_iter,
            "clip_skip": clip_skip,
        }
        if overrides.get("sd_model_checkpoint"):
            generate_body["model"] = a1111_model_name(models, _text(overrides, "sd_model_checkpoint", None))
        if img2img:
            images = body.get("init_images")
            if not isinstance(images, list) or not images:
                raise ImagineError("init_images must be a list holding the picture to start from, as base64")
            only_masked = body.get("inpaint_full_res", True)
            generate_body |= {
                "img": images[0],
                "strength": A1111_STRENGTH if body.get("denoising_strength") is None else body["denoising_strength"],
                "mask": a1111_mask(body),
                "mask_blur": body.get("mask_blur"),
                "inpaint_area": "masked" if only_masked not in (False, 0) else "whole",
                "inpaint_padding": body.get("inpaint_full_res_padding"),
            }
        req = parse_request(generate_body, settings.max_size, settings.max_batch)
    except ImagineError as error:
        if error.status != 400:
            raise
        field, _, rest = error.message.partition(" ")
        message = A1111_FIELD_NAMES.get(field, field) + " " + rest if rest else error.message
        raise ImagineError(message, 422) from None
    understood = {
        "sampler_name": sampler_name,
        "scheduler": A1111_SCHEDULERS[scheduler],
        "batch_size": batch_size,
        "n_iter": n_iter,
        "send_images": body.get("send_images", True) is not False,
        "restore_afterwards": body.get("override_settings_restore_afterwards", True) is not False,
        "ignored": a1111_ignored(body),
    }
    return req, understood


def a1111_answer(body: dict, event: Finished, job: Job, understood: dict, models) -> dict:
    """txt2img's and img2img's answer: the pictures as bare base64 PNGs, the request as understood, and
    `info`, a JSON string in A1111's layout."""
    req, seeds = job.request, event.seeds
    prompts, title = [req.prompt] * len(seeds), a1111_titles(models).get(job.model_key, {})
    info = {
        "prompt": req.prompt,
        "all_prompts": prompts,
        "negative_prompt": req.neg,
        "all_negative_prompts": [req.neg] * len(seeds),
        "seed": event.seed,
        "all_seeds": seeds,
        "subseed": event.seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": event.image.width,
        "height": event.image.height,
        "sampler_name": understood["sampler_name"],
        "scheduler": understood["scheduler"],
        "cfg_scale": req.guidance,
        "steps": req.num_steps,
        "batch_size": understood["batch_size"],
        "restore_faces": False,
        "sd_model_name": Path(event.model).stem,
        "sd_model_hash": title.get("hash"),
        "denoising_strength": req.strength if req.img is not None else None,
        "index_of_first_image": 0,
        "infotexts": [parameters for _, parameters in event.pictures],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() - event.seconds)),
        "clip_skip": req.clip_skip,
        "version": A1111_VERSION,
        "imagine_ignored": understood["ignored"],
    }
    images = [png_base64(image, parameters) for image, parameters in event.pictures]
    parameters = {key: value for key, value in body.items() if key not in ("auth", "init_images", "mask")}
    parameters |= {
        "prompt": req.prompt,
        "negative_prompt": req.neg,
        "seed": event.seed,
        "width": event.image.width,
        "height": event.image.height,
        "steps": req.num_steps,
        "cfg_scale": req.guidance,
        "sampler_name": understood["sampler_name"],
        "scheduler": understood["scheduler"],
        "batch_size": understood["batch_size"],
        "n_iter": understood["n_iter"],
        "denoising_strength": info["denoising_strength"],
    }
    return {"images": images if understood["send_images"] else [], "parameters": parameters, "info": json.dumps(info)}


class ModelHashes:
    """The sha256 of model files, which A1111's titles carry ("name.safetensors [0123456789]"). Reading a
    multi-GB file takes seconds, so each is hashed once, on a thread of its own (one at a time), and kept by
    path, size and date in the server's memory; until it is known, the model is listed without a hash, as
    A1111 lists one it has not hashed yet."""

    def __init__(self):
        self.known = {}  # (path, size, mtime) -> sha256
        self.queued = set()
        self.one_at_a_time = threading.Lock()  # files are read one after another, not all at once

    def get(self, path: Path) -> str | None:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self.known and key not in self.queued:
            self.queued.add(key)
            threading.Thread(target=self.hash_file, args=(key,), name="imagine-hash", daemon=True).start()
        return self.known.get(key)

    def hash_file(self, key: tuple) -> None:
        digest = hashlib.sha256()
        with self.one_at_a_time:
            try:
                with open(key[0], "rb") as file:
                    while block := file.read(2**20):
                        digest.update(block)
            except OSError:
                log.warning("cannot read a model file to hash it")
                return
        self.known[key] = digest.hexdigest()


def a1111_titles(models) -> dict:
    """Every model the folders hold, by its key (see Models.resolve), as A1111's sd-models lists it."""
    listed = {DEMO_MODEL: {"title": DEMO_MODEL, "model_name": DEMO_MODEL, "hash": None, "sha256": None}}
    folders = model_folders(models.settings.models_dir)
    for entry in models.listing():
        if entry.get("error"):
            continue
        found = find_in_folders(folders, entry["name"], CHECKPOINT_SUFFIXES)
        real = real_path(found)
        sha256 = models.hashes.get(real) if real.is_file() else None
        name = entry["name"] if entry["name"].endswith(found.suffix) else entry["name"] + found.suffix
        title = f"{name} [{sha256[:10]}]" if sha256 else name
        model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        listed[str(real)] = {"title": title, "model_name": model_name, "hash": sha256 and sha256[:10], "sha256": sha256}
        listed[str(real)]["filename"] = name  # A1111 gives the absolute path; a server path is never told
    return listed


def a1111_model_name(models, checkpoint: str) -> str:
    """The model an A1111 client names by its title, its name (with or without extension or " [hash]"),
    its model_name or its hash, as a name Models.resolve takes."""
    bare = re.sub(r"\s*\[[0-9a-f]+\]$", "", checkpoint.strip())
    for key, listed in a1111_titles(models).items():
        names = {listed["title"], listed["model_name"], listed.get("filename"), listed["hash"], listed["sha256"]}
        filename = listed.get("filename") or key
        if checkpoint in names or bare in names or bare == os.path.splitext(filename)[0]:
            return filename
    raise ImagineError(f"model {checkpoint!r} not found; GET /sdapi/v1/sd-models lists the models", 404)


def a1111_progress(engine, with_image: bool, previews: dict) -> dict:
    """GET /sdapi/v1/progress: where the running generation stands, built only when asked. The preview is
    kept in `previews` for its step: a client polling faster than the steps come gets it without a new PNG."""
    job = engine.running
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if job is None or job.started is None:
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
    step, steps, latents = job.step, job.steps, job.latents
    progress = min(1.0, step / steps if steps else 0)
    elapsed = time.time() - job.started
    state |= {
        "skipped": job.stop_early == "skip",
        "interrupted": job.stop_early == "interrupt",
        "job": "img2img" if job.request.img is not None else "txt2img",
        "job_count": 1,  # A1111 counts pipeline calls; a batch is one
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)),
        "sampling_step": step,
        "sampling_steps": steps,
    }
    image = None
    if with_image and latents is not None:  # the batch's first picture, as A1111 shows
        if previews.get("latents") is not latents:
            size = (job.request.width, job.request.height)
            preview = png_base64(latents_to_preview(latents, job.model.family.latent_rgb, size), None, 1)
            previews.update(latents=latents, image=preview)
        image = previews["image"]
    return {
        "progress": progress,
        "eta_relative": elapsed / progress - elapsed if progress else 0,
        "state": state,
        "current_image": image,
        "textinfo": f"Step {step}/{steps}" + (f", {job.request.n} pictures" if job.request.n > 1 else ""),
    }


def png_info(data: str) -> dict:
    """POST /sdapi/v1/png-info: a PNG's parameters text, its other text chunks, and the parameters read apart."""
    raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data, validate=False)
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Exception:  # noqa: BLE001 (any undecodable upload is the client's error)
        raise ImagineError("image is not a picture that can be read", 422) from None
    texts = {key: value for key, value in image.info.items() if isinstance(value, str)}
    info = texts.pop("parameters", "")
    return {"info": info, "items": texts, "parameters": parse_parameters(info)}


def parse_parameters(text: str) -> dict:
    """A1111's infotext ("prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler, ...") as a dict of strings."""
    if not text:
        return {}
    lines = text.split("\n")
    settings = lines.pop() if len(lines) > 1 or re.search(r"\bSteps: ", lines[0]) else ""
    prompt, neg = [], []
    for line in lines:
        if line.startswith("Negative prompt:") or neg:
            neg.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt.append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(neg)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings):
        parsed[key] = value
    if "Size" in parsed:
        parsed["Size-1"], _, parsed["Size-2"] = parsed["Size"].partition("x")
    return parsed


def add_a1111_routes(app: Flask, engine: Engine, generation_slots) -> None:
    settings, models = engine.settings, engine.models
    models.hashes = ModelHashes()

    def run_a1111(img2img: bool):
        if not generation_slots.acquire(blocking=False):
            raise engine.busy()
        try:
            body = read_json_body()
            req, understood = a1111_request(body, img2img, models, settings)
            job = engine.submit(req, request.environ.get("waitress.client_disconnected"))
            for event in job:
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    if req.model is not None and not understood["restore_afterwards"]:
                        settings.model = req.model
                    return jsonify(a1111_answer(body, event, job, understood, models))
        finally:
            generation_slots.release()

    @app.post("/sdapi/v1/txt2img")
    def a1111_txt2img():
        return run_a1111(img2img=False)

    @app.post("/sdapi/v1/img2img")
    def a1111_img2img():
        return run_a1111(img2img=True)

    @app.get("/sdapi/v1/sd-models")
    def a1111_models():
        return jsonify([{**listed, "config": None} for listed in a1111_titles(models).values()])

    def current_title() -> str:
        titles = a1111_titles(models)
        return titles.get(models.resolve(None), {}).get("title", settings.model)

    @app.get("/sdapi/v1/options")
    def a1111_options():
        return jsonify(
            sd_model_checkpoint=current_title(),
            sd_checkpoint_hash=a1111_titles(models).get(models.resolve(None), {}).get("sha256"),
            CLIP_stop_at_last_layers=1,
            sd_checkpoints_limit=settings.max_loaded,
            sd_vae="Automatic",
            samples_format="png",
            enable_pnginfo=True,
            show_progress_every_n_steps=1,
            live_previews_enable=True,
        )

    @app.post("/sdapi/v1/options")
    def a1111_set_options():
        body = read_json_body()
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None:
            name = a1111_model_name(models, _text(body, "sd_model_checkpoint", None))
            first = next(iter(engine.load_model(name)))
            if isinstance(first, Failed):
                raise first.error
            settings.model = name  # for this run of the server; --model stays the default after a restart
        return jsonify(None)

    previews = {}  # the latest preview and the latents it shows

    @app.get("/sdapi/v1/progress")
    def a1111_progress_route():
        skip = request.args.get("skip_current_image", "false").lower() == "true"
        return jsonify(a1111_progress(engine, not skip, previews))

    def finish_early(how: str):
        if engine.running is not None:
            engine.running.finish_early(how)

    @app.post("/sdapi/v1/interrupt")
    def a1111_interrupt():
        finish_early("interrupt")
        return jsonify({})

    @app.post("/sdapi/v1/skip")
    def a1111_skip():
        finish_early("skip")
        return jsonify(None)

    @app.get("/sdapi/v1/samplers")
    def a1111_samplers():
        return jsonify([{"name": name, "aliases": [], "options": {}} for name in A1111_SAMPLERS])

    @app.get("/sdapi/v1/schedulers")
    def a1111_schedulers():
        return jsonify(
            [
                {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in A1111_SCHEDULERS.items()
            ]
        )

    @app.get("/sdapi/v1/loras")
    def a1111_loras():
        return jsonify(
            [
                {"name": lora["name"], "alias": lora["name"], "path": lora["name"], "metadata": {}}
                for lora in lora_listing(settings)
            ]
        )

    @app.get("/sdapi/v1/embeddings")
    def a1111_embeddings():
        files = list_files(settings, "embeddings", EMBEDDING_SUFFIXES)
        loaded = {
            name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
            for name in files
        }
        return jsonify(loaded=loaded, skipped={})

    @app.get("/sdapi/v1/upscalers")
    def a1111_upscalers():
        # SillyTavern takes the first as "None" and puts the latent modes after it.
        return jsonify([{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}])

    empty_lists = ("sd-vae", "latent-upscale-modes", "face-restorers", "prompt-styles", "hypernetworks")
    for name in empty_lists:
        app.add_url_rule(f"/sdapi/v1/{name}", f"a1111_{name}", lambda: jsonify([]))

    @app.get("/sdapi/v1/scripts")
    def a1111_scripts():
        return jsonify(txt2img=[], img2img=[])

    @app.get("/sdapi/v1/cmd-flags")
    def a1111_cmd_flags():
        # Only what a client may know: the models folder and the key are not told.
        return jsonify(api=True, nowebui=True, listen=not is_loopback(settings.host), port=settings.port)

    @app.post("/sdapi/v1/png-info")
    def a1111_png_info():
        return jsonify(png_info(_text(read_json_body(), "image", "")))


# ---------------------------------------------------------------------------------------------
# The HTTP server: waitress, with deadlines so that slow or silent clients cannot hold it
# ---------------------------------------------------------------------------------------------

CONNECTION_LIMIT = 200  # open connections; more wait in the kernel's queue until one closes
IDLE_TIMEOUT = 30  # seconds an idle kept-alive connection stays open
REQUEST_TIMEOUT = 60  # seconds a client has to send its whole request: headers trickled byte by byte are dropped
SEND_TIMEOUT = 60  # seconds an answer may wait for a client that does not read it, before the client is dropped
# A client whose end of stream (FIN) comes this soon (seconds) after its request shut down only its sending side
# (as `nc -N` does) and waits for the answer; one whose FIN comes later has left, and its generation is cancelled.
HALF_CLOSE_GRACE = 2.0
# Unfinished request bodies are spooled to temporary files: all of them together may hold this much.
UPLOADS_BUDGET = 4 * MAX_BODY_BYTES
# Threads beyond one for each request the queue accepts: they answer other routes, 503s and errors at once.
SPARE_THREADS = 3


class Channel(HTTPChannel):
    """A waitress connection with deadlines, a bound on what unfinished uploads hold, and half-closed clients
    answered. waitress runs these methods on its one event-loop thread, and asks readable() every second."""

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        self.request_started = None  # when the first byte of the request being received came (time.time())
        self.request_bytes = 0  # what that request holds so far, counted in server.uploads
        self.stalled_since = time.time()  # since when an answer waits with nothing of it sent
        self.half_closed = False  # the client sent its request, then shut down its side of the connection
        self.request_received = 0.0  # when the last whole request came in (time.time())

    def received(self, data):
        if self.request_started is None:
            self.request_started = time.time()
        self.hold_upload(len(data))
        if self.server.uploads > UPLOADS_BUDGET:
            log.warning("dropped a client: unfinished uploads would hold over %d MiB", UPLOADS_BUDGET >> 20)
            self.will_close = True
            return False
        done = super().received(data)
        if self.request is None:  # no request is half received
            self.hold_upload(-self.request_bytes)
            self.request_started = None
            if self.requests:
                self.request_received = time.time()
        return done

    def hold_upload(self, size: int) -> None:
        self.request_bytes += size
        self.server.uploads = getattr(self.server, "uploads", 0) + size

    def handle_read(self):
        # TCP cannot tell a client that shut only its sending side (SHUT_WR, as `nc -N` does) from one that left:
        # both send a FIN. A FIN right behind a whole request is read as the first, a later one as the second,
        # however recently the answer's last streamed line went out.
        request_waits = self.requests and self.request is None
        if request_waits and time.time() - self.request_received < HALF_CLOSE_GRACE and self.peer_shut_down():
            self.half_closed = True
            return
        super().handle_read()

    def peer_shut_down(self) -> bool:
        """Whether the client's end of stream (FIN) is waiting right behind its request."""
        try:
            return self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:  # nothing waiting (EAGAIN), or the connection is broken
            return False

    def readable(self):
        now = time.time()  # the clock of waitress's last_activity
        if self.will_close:
            return False
        if self.request_started is not None and now - self.request_started > REQUEST_TIMEOUT:
            log.warning("dropped a client that took over %d s to send its request", REQUEST_TIMEOUT)
            self.will_close = True
        if not self.total_outbufs_len or self.last_activity > self.stalled_since:
            self.stalled_since = now  # nothing to send, or something was sent since the last look
        elif now - self.stalled_since > SEND_TIMEOUT:
            log.warning("dropped a client that read nothing of its answer for %g s", SEND_TIMEOUT)
            self.drop()
            return False
        if self.half_closed and not self.requests:
            self.close_when_flushed = True  # it is answered, and can send nothing more
        return not self.half_closed and super().readable()

    def drop(self) -> None:
        """Closes the connection now, unsent data and all. Not with will_close: waitress closes such a connection
        only once its socket can take more data, which never comes for a client that does not read; the thread
        writing its answer would wait forever, holding a generation slot."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not linger
        self.handle_close()  # wakes the writing thread: its next write raises ClientDisconnected, closing the body

    def writable(self):
        return self.connected and super().writable()  # a dropped connection is out of the loop's select

    def handle_close(self):
        self.hold_upload(-self.request_bytes)
        self.request_bytes = 0
        super().handle_close()


def create_server(engine: Engine, host: str, port: int):
    """The production HTTP server (waitress) for the app; its `run()` serves until the process ends."""
    import waitress  # only the server needs it

    server = waitress.create_server(
        create_app(engine),
        host=host,
        port=port,
        # A thread for each waiting request and the running one (see generation_slots), and spares.
        threads=engine.settings.max_queue + 1 + SPARE_THREADS,
        # Reading ahead on each connection is what lets waitress notice that a client has left.
        channel_request_lookahead=1,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=IDLE_TIMEOUT,
        cleanup_interval=5,  # how often idle connections are looked for
        # Flask answers bodies over MAX_BODY_BYTES with a JSON 413; waitress refuses larger ones from their
        # Content-Length, unread (with a margin for a body that is just over, to get Flask's clearer answer).
        max_request_body_size=MAX_BODY_BYTES + 2**20,
        max_request_header_size=64 * 2**10,
        # An answer waits in memory or a spool file until the client reads it; past 4 MB unsent, the thread
        # writing it waits too, until SEND_TIMEOUT drops the client.
        outbuf_high_watermark=4 * 2**20,
    )
    # waitress makes one server per address a name resolves to ("localhost": 127.0.0.1 and ::1).
    for each in [server, *getattr(server, "map", {}).values()]:
        if hasattr(each, "channel_class"):
            each.channel_class = Channel
    return server


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def check_default_model(engine: Engine) -> None:
    """Finds (does not load) the --model default, so that a mistyped name stops the start, not the first request."""
    settings = engine.settings
    try:
        engine.models.resolve(settings.model)
    except ImagineError as error:
        folders = ", ".join(str(folder) for folder in model_folders(settings.models_dir))
        where = f"the models folders {folders} (--models-dir, IMAGINE_MODELS_DIR)"
        why = f"is neither in {where} nor a path to a model" if error.status == 404 else f"cannot be used: {error}"
        raise SystemExit(f"imagine: the default model {settings.model!r} (--model, IMAGINE_MODEL) {why}") from None


def main(argv=None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = Engine(settings)
    check_default_model(engine)
    log.info(
        "device %s, precision %s, default model %s, models folders %s",
        engine.device, str(engine.dtype).removeprefix("torch."), settings.model, settings.models_dir,
    )  # fmt: skip
    for folder in model_folders(settings.models_dir):
        if not folder.is_dir():
            log.warning("models folder %s does not exist; models there cannot be found (--models-dir)", folder)
    try:
        server = create_server(engine, settings.host, settings.port)
    except OSError as error:
        raise SystemExit(f"imagine: cannot listen on {settings.host}:{settings.port}: {error.strerror}") from None
    # SIGTERM (systemctl stop) and Ctrl-C cancel the running and waiting requests, then main() returns.
    # The handler only sets an event: stop() takes locks that the interrupted main thread may hold.
    stop_requested = threading.Event()
    threading.Thread(target=lambda: stop_requested.wait() and engine.stop(), name="stop", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    threading.Thread(target=server.run, name="http", daemon=True).start()
    if not is_loopback(settings.host) and not settings.api_key:
        log.warning("other machines can reach this server and no API key is set: anyone may use it (IMAGINE_API_KEY)")
    log.info("listening on http://%s:%d", settings.host, settings.port)
    engine.run_forever()
    # Let the HTTP threads send their last answers (the cancelled job's error) before the process ends.
    server.task_dispatcher.shutdown(timeout=10)
    log.info("stopped")


if __name__ == "__main__":
    main()
