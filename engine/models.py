"""Loaded models: loading offline, the cache of the most recently used, and cancel points. What there is to load,
and its family, is the catalogue's (engine/files/catalog.py)."""

import collections
import contextvars
import dataclasses
import gc
import itertools
import logging
import time
import warnings
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from engine.compiling import compile_pays, compiled_unet
from engine.demo import build_demo_pipeline
from engine.encodings import Encodings
from engine.errors import Cancelled, ImagineError
from engine.files.catalog import Catalog
from engine.files.families import Family
from engine.files.parts import build_flow_pipeline, read_sidecar
from engine.logs import escaped
from engine.settings import CONFIGS_DIR, DEMO_MODEL, Settings

log = logging.getLogger("imagine")

# The log reports loads and generations; the libraries' progress bars (one per LoRA's text-encoder weights)
# and notices (torchsde's float rounding; peft's when a second LoRA joins, which is what Imagine wants) say
# nothing actionable to someone running a server. Real errors still reach the log.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message="Should have tb<=t1", module="torchsde")
warnings.filterwarnings("ignore", message="Already found a `peft_config`", module="peft")


@dataclasses.dataclass
class LoadedModel:
    name: str
    family: Family
    txt2img: DiffusionPipeline
    img2img: DiffusionPipeline  # built from txt2img's modules: the weights exist once
    scheduler_config: dict  # the model's own scheduler settings, the base of every sampler
    inpaint: DiffusionPipeline = None  # built from txt2img's modules too
    # file_version -> adapter
    loras: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    lora_hashes: dict = dataclasses.field(default_factory=dict)  # adapter -> short hash (see lora_short_hash)
    adapter_numbers: itertools.count = dataclasses.field(default_factory=itertools.count)
    embeddings: dict = dataclasses.field(default_factory=dict)  # name -> (file_version, vectors per text encoder)
    active_loras: tuple = ()  # (adapter, weight) of each LoRA the model draws with now (loras.use_loras)
    encodings: Encodings = dataclasses.field(default_factory=Encodings)  # its encoded prompts (engine/encodings.py)
    # A flow model file's sidecar as it was loaded with ({} where it had none; engine/files/parts.py): when it is
    # edited, the model loads again with the parts it now names. None for other models.
    sidecar: dict | None = None
    # The UNet compiled (--compile; engine/compiling.py), run by requests without LoRAs; None where not compiled.
    compiled_unet: torch.nn.Module | None = None


def sidecar_changed(model: LoadedModel, path: Path) -> bool:
    """Whether a loaded flow model's sidecar names other parts now (or cannot be read: loading again says why)."""
    if model.sidecar is None:
        return False
    try:
        return read_sidecar(path) != model.sidecar
    except ImagineError:
        return True


class Models:
    """Loads models once, and keeps the `max_loaded` most recently used; `catalog` finds them by name."""

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype, configs_dir: Path = CONFIGS_DIR):
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.configs_dir = configs_dir
        self.loaded = collections.OrderedDict()  # model key -> LoadedModel, least recently used first
        self.catalog = Catalog(settings, self.loaded)

    def get(self, key: str) -> LoadedModel:
        if key in self.loaded and self.changed_beside(key):
            self.unload(key)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        # Check the model before unloading another for it: a request for a file that cannot load
        # must not cost the next request a reload of the model it evicted.
        family = self.catalog.checked_family(key)
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
        log.info("loaded %s (%s) in %.1f s", escaped(model.name), model.family.label, time.perf_counter() - started)
        self.loaded[key] = model
        return model

    def changed_beside(self, key: str) -> bool:
        """Whether the files beside a loaded model say otherwise now: a sidecar naming other parts, or a `.yaml` or a
        folder's config that gives it another family (whose scheduler settings it was loaded with)."""
        model = self.loaded[key]
        if sidecar_changed(model, Path(key)):
            log.info("the sidecar of %s changed: loading it again", escaped(model.name))
            return True
        if self.catalog.known_family(key) is not model.family:
            log.info("the family of %s changed: loading it again", escaped(model.name))
            return True
        return False

    def load_or_refuse(self, key: str, family: Family) -> LoadedModel:
        """load(), with a model whose files are missing or damaged refused in words that name no server path."""
        try:
            return self.load(key, family)
        except (ImagineError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            log.exception("cannot load %s", escaped(key))
            raise ImagineError(
                f"the model cannot be loaded: its files are incomplete or damaged ({type(error).__name__}); "
                "the server log has the details",
                422,
            ) from None

    def reload(self, key: str) -> None:
        try:
            self.loaded[key] = self.load(key, self.catalog.checked_family(key))
            log.info("reloaded %s", escaped(self.loaded[key].name))
        except Exception:
            log.exception("cannot reload %s", escaped(key))

    def unload(self, key: str) -> None:
        model = self.loaded.pop(key)
        log.info("unloading %s", escaped(model.name))
        # Its encoded prompts go now, even where a reference to the model outlives this (an out-of-memory error's
        # traceback holds the job's frames): the memory is what an unload is for.
        model.encodings.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def load(self, key: str, family: Family) -> LoadedModel:
        path = Path(key)
        sidecar = None
        if key == DEMO_MODEL:
            pipe = build_demo_pipeline(self.configs_dir / family.config)
        elif family.flow and path.is_file():
            sidecar = read_sidecar(path)
            model, parts = self.catalog.flow_parts(path)
            pipe = build_flow_pipeline(family, path, model, parts, self.configs_dir / family.config, self.dtype)
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
        self.place(pipe, family)
        img2img = family.img2img(**pipe.components, **pipeline_options(pipe))
        inpaint = family.inpaint(**pipe.components, **pipeline_options(pipe))
        for each in (pipe, img2img, inpaint):
            each.set_progress_bar_config(disable=True)
        model = LoadedModel(
            path.stem if path.is_file() else path.name,
            family,
            pipe,
            img2img,
            dict(pipe.scheduler.config),
            inpaint=inpaint,
            sidecar=sidecar,
            encodings=Encodings(self.settings.prompt_cache),
            compiled_unet=compiled(getattr(pipe, "unet", None)),  # the flow families' pipelines have no UNet
        )
        add_cancel_points(model)
        return model

    def place(self, pipe, family: Family) -> None:
        """Puts the pipeline on the device in the server's precision; a flow model's fp8 weights stay fp8 (their layers
        cast as they run: engine/files/diffusion_models.py), and with --offload its parts wait in CPU memory until
        used."""
        if self.settings.offload == "model" and self.device.type != "cpu":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.settings.offload == "sequential" and self.device.type != "cpu":
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif family.flow:
            pipe.to(self.device)
        else:
            pipe.to(device=self.device, dtype=self.dtype)
        pipe.vae.enable_slicing()  # a batch decodes one picture at a time: the memory of one, in the same time
        if family.flow:
            # A big picture's decode is the peak of a flow model's memory: tiles keep it to that of a small one.
            pipe.vae.enable_tiling()
        else:
            self.speed_up_unet(pipe)

    def speed_up_unet(self, pipe) -> None:
        """The options that pay off here; attention already uses PyTorch's fused SDPA (diffusers' default)."""
        if self.device.type == "cuda":
            # Faster fp16 steps on NVIDIA GPUs by diffusers' figures; slower on a CPU, so GPUs only
            # (docs/performance.md, Figures behind the code).
            pipe.unet.to(memory_format=torch.channels_last)
        compile, why = compile_pays(self.settings.compile, self.device, self.dtype, pipe.unet)
        log.info("compiled UNet: %s (%s)", "yes, on its first generation" if compile else "no", why)
        if compile:
            pipe.unet = compiled_unet(pipe.unet)

    def download(self, repo_id: str, family: Family):
        try:
            return family.txt2img.from_pretrained(repo_id, torch_dtype=self.dtype)
        except (OSError, ValueError) as error:
            raise ImagineError(f"model {repo_id!r} could not be downloaded: {error}", 502) from error


# What the cancel points ask: the running job's cancelled(), set by the engine for the job's run on its thread.
cancel_check = contextvars.ContextVar("cancel_check", default=None)

# Modules before which a generation checks whether it was cancelled: every ResNet block, attention and
# feed-forward layer of the UNet and VAE, and every text-encoder layer. A step of SD1.5 at 512x512 runs
# about 100 of them, so a cancel takes effect within a small part of a step rather than at its end.
CANCEL_POINTS = ("ResnetBlock2D", "Attention", "FeedForward", "CLIPEncoderLayer",
                 # The flow-matching families' transformer blocks and text-encoder layers.
                 "FluxTransformerBlock", "FluxSingleTransformerBlock", "Flux2TransformerBlock",
                 "Flux2SingleTransformerBlock", "ZImageTransformerBlock", "Qwen3DecoderLayer", "T5Block")  # fmt: skip


def compiled(unet) -> torch.nn.Module | None:
    """The UNet if torch.compile wrapped it (speed_up_unet), else None."""
    return unet if hasattr(unet, "_orig_mod") else None


def add_cancel_points(model: LoadedModel) -> None:
    """Makes each cancel point raise Cancelled once the running job's cancelled() says so. The hooks raise before a
    module runs and no module keeps state between calls, so nothing is left half-changed for the next run."""

    def stop_if_cancelled(module, args):
        cancelled = cancel_check.get()
        if cancelled is not None and cancelled():
            raise Cancelled

    for component in model.txt2img.components.values():
        # A compiled UNet (--compile) would be cut into pieces at each hook: it stops at the end of a step only.
        if isinstance(component, torch.nn.Module) and not hasattr(component, "_orig_mod"):
            for module in component.modules():
                if type(module).__name__ in CANCEL_POINTS:
                    module.register_forward_pre_hook(stop_if_cancelled)


def pipeline_options(pipe) -> dict:
    """The pipeline's own settings (klein's is_distilled), for its img2img and inpaint siblings."""
    return {"is_distilled": pipe.config.is_distilled} if "is_distilled" in pipe.config else {}
