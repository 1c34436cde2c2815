"""Compiled kernels (--compile): whether compiling a model's UNet pays on this device, the compiled UNet with its
caches on disk, which UNet a request runs on, and the notice that a first generation waits for the compiler."""

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

from engine.devices import cpu_bf16_feature

log = logging.getLogger("imagine")

# Where inductor keeps what it compiled (its FX graph cache and C++ kernels), so that a restart finds it: a later start
# still traces and freezes, about a third of the first compile (docs/performance.md, Compiled kernels).
# TORCHINDUCTOR_CACHE_DIR, torch's own variable, wins.
CACHE_DIR = Path("~/.imagine/compiled")

# Compiling a UNet costs a minute or more on a small CPU whatever its size, and saves in proportion to its work: the
# tiny test models (a few million parameters) would never win it back; SD1.5's UNet has 860 million.
MIN_PARAMETERS = 100_000_000

# What a first generation waits, said in its notice: measured on 2 cores (docs/performance.md, Compiled kernels).
COMPILING = (
    "this generation first compiles the UNet (--compile): about 2 minutes on 2 CPU cores, once per model, and once "
    "more the first time its width, height, prompt length or batch changes; later ones run faster"
)


def compile_cache_dir() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", CACHE_DIR.expanduser()))


def compile_pays(setting: str, device: torch.device, dtype: torch.dtype, unet: torch.nn.Module) -> tuple:
    """Whether to compile `unet` under --compile `setting`, and why, in words for the log."""
    if setting != "auto":
        return setting == "on", f"--compile {setting}"
    if sum(parameter.numel() for parameter in unet.parameters()) < MIN_PARAMETERS:
        return False, "a small UNet: compiling would cost more than it saves"
    if device.type == "cuda":
        # Not measured here: 1.2-2x faster steps reported for SD1.5 in float16 on an A100 (docs/performance.md).
        return True, "reported 1.2-2x faster steps on GPUs"
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_feature():
        # Measured on 2 cores with avx512_bf16: SD1.5's UNet step in 0.91x eager's time at 512x512, 0.745x at 256x256.
        return True, f"bfloat16 on a CPU that runs it natively ({cpu_bf16_feature()})"
    return False, "no measured gain here (float32 on a CPU, or MPS)"


def compiled_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet compiled by inductor on its first call, its weights frozen into the kernels (freezing: constant
    folding and oneDNN's prepacked weights)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    return torch.compile(unet, options={"freezing": True})


def choose_unet(model, req) -> None:
    """Puts the UNet this request runs on in the model's pipelines: the compiled one, or the plain one once a LoRA is
    loaded, as frozen weights would not see it and each LoRA weight would compile anew."""
    compiled = model.compiled_unet
    if compiled is None:
        return
    if req.loras and not model.loras:
        log.info("%s has a LoRA from now on: it runs on its uncompiled UNet until it is loaded again", model.name)
    unet = compiled._orig_mod if req.loras or model.loras else compiled
    for pipe in (model.txt2img, model.img2img, model.inpaint):
        pipe.unet = unet


@contextlib.contextmanager
def telling_when_compiling(*notices: list):
    """While a generation runs: when the compiler starts, says so in the log and in `notices`, its answers', and how
    long it took in the log. It starts at a model's first picture, and again the first time a dimension (width,
    height, prompt length, batch) changes: dynamo's automatic dynamic shapes then compile kernels for any value of
    it, so compiling does not happen per size."""
    started = []

    def tell(args) -> None:
        if not started:
            for answer_notices in notices:
                answer_notices.append(COMPILING)
            log.warning("%s", COMPILING)
        started.append(time.perf_counter())

    def took(args) -> None:
        log.info("compiled in %.0f s", time.perf_counter() - started[-1])

    torch._dynamo.callback_handler.register_start_callback(tell)
    torch._dynamo.callback_handler.register_end_callback(took)
    try:
        yield
    finally:
        torch._dynamo.callback_handler.remove_start_callback(tell)
        torch._dynamo.callback_handler.remove_end_callback(took)
