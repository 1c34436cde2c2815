"""Loaded models: name resolution, loading offline, the cache of the most recently used, cancel points,
and the tiny demo model."""

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
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.errors import Cancelled, ImagineError
from engine.files.diffusion_models import recognise_diffusion_model
from engine.files.families import (
    FAMILIES,
    Family,
    checkpoint_family,
    family_deciding_files,
    flow_family_name,
    folder_family,
    refuse_pickles_that_could_run,
)
from engine.files.folders import (
    CHECKPOINT_SUFFIXES,
    NOT_CHECKPOINTS,
    FolderReader,
    check_model_name,
    checkpoint_folders,
    find_in_folders,
    is_model_entry,
    is_repo_id,
    model_folders,
    model_name,
    real_path,
    relative_to_folders,
    walk_folders,
)
from engine.files.headers import Headers, Truncated
from engine.files.parts import PartFinder, build_flow_pipeline, gguf_not_yet, read_sidecar
from engine.files.scaled_fp8 import refuse_block_scaled
from engine.files.tensors import file_version
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
    # A flow model file's sidecar as it was loaded with ({} where it had none; engine/files/parts.py): when it is
    # edited, the model loads again with the parts it now names. None for other models.
    sidecar: dict | None = None


def sidecar_changed(model: LoadedModel, path: Path) -> bool:
    """Whether a loaded flow model's sidecar names other parts now (or cannot be read: loading again says why)."""
    if model.sidecar is None:
        return False
    try:
        return read_sidecar(path) != model.sidecar
    except ImagineError:
        return True


def versions(paths: list) -> tuple:
    """The file_version of each file, () for one that is not there (a checkpoint without a `.yaml` beside it)."""
    found = []
    for path in paths:
        try:
            found.append(file_version(path))
        except OSError:
            found.append(())
    return tuple(found)


FALLBACKS_KEPT = 64  # unknown model names remembered as told once in the log; older ones are told again


class Models:
    """Finds models by name, loads them once, and keeps the `max_loaded` most recently used."""

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype, configs_dir: Path = CONFIGS_DIR):
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.configs_dir = configs_dir
        self.loaded = collections.OrderedDict()  # model key -> LoadedModel, least recently used first
        self.default = settings.model  # the model a request that names none gets; A1111 clients may switch it
        self.fallen_back = collections.OrderedDict()  # names resolve_or_default logged as drawn by the default
        self.family_cache = {}  # path -> (the versions of the files deciding its family, what was read there)
        self.headers = Headers()
        self.parts = PartFinder(self.headers)
        self.reader = FolderReader()

    def resolve(self, name: str | None) -> str:
        """Turns a request's model name into the key it is loaded and cached under: 'demo', a path, or a hub repo id.

        The name comes from the network, so it may only name entries of the models folders (see
        check_model_name); links inside them are followed. Only the configured default model may live elsewhere.
        """
        configured = name is None or name == self.default
        name = self.default if name is None else name
        if name == DEMO_MODEL:
            return DEMO_MODEL
        folders = checkpoint_folders(model_folders(self.settings.models_dir))
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
            if found.suffix == ".gguf":
                raise gguf_not_yet(f"model {name!r}")
            raise ImagineError(f"model {name!r} is not a .safetensors or .ckpt file or a diffusers folder")
        if self.settings.allow_downloads and is_repo_id(name):
            return name
        if find_in_folders(folders, relative_to_folders(name, folders), (".gguf",)) is not None:
            raise gguf_not_yet(f"model {name!r}")
        raise ImagineError(
            f"model {name!r} not found in the models folders (--models-dir, IMAGINE_MODELS_DIR); "
            "GET /models lists the models a request can name, 'demo' (built in) among them",
            404,
        )

    def resolve_or_default(self, name: str | None) -> str:
        """resolve(), with the default model for a name the folders lack (clients of OpenAI's API send dall-e-3)."""
        try:
            return self.resolve(name)
        except ImagineError as error:
            if error.status != 404:
                raise
        if name not in self.fallen_back:
            log.info("model %r is not here; the default model %r draws instead", str(name)[:80], self.default)
        self.fallen_back[name] = True  # the newest FALLBACKS_KEPT names: no state grows with every name sent
        self.fallen_back.move_to_end(name)
        while len(self.fallen_back) > FALLBACKS_KEPT:
            self.fallen_back.popitem(last=False)
        return self.resolve(None)

    def listing(self) -> list[dict]:
        """Every model a request can name, in the order names are resolved: the built-in demo first, then the
        folders' single files and diffusers folders, recursively, links followed; LoRAs and embeddings, which live
        in their own sub-folders, left out. Read on the folder reader's thread (see FolderReader)."""
        return self.reader.read(self.read_listing)

    def read_listing(self) -> list[dict]:
        folders = checkpoint_folders(model_folders(self.settings.models_dir))
        demo = {"family": FAMILIES["sd1"].name, "size": 0, "modified": None, "loaded": DEMO_MODEL in self.loaded}
        listed = [{"name": DEMO_MODEL, **demo, "builtin": True}]
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
            listed.append({"name": name, **described, "loaded": str(real) in self.loaded, "builtin": False})
        return listed

    def describe(self, real: Path) -> dict:
        """Family, size and date of a model file or folder."""
        stat = real.stat()
        size = stat.st_size if real.is_file() else sum(f.stat().st_size for f in real.rglob("*") if f.is_file())
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime))
        described = {**self.cached_family(real), "size": size, "modified": modified}
        family = FAMILIES.get(described["family"])
        if family is not None and family.flow:  # found afresh each time: parts come and go beside the model
            in_folder = {component: "in the folder" for component, _ in family.parts}
            described["parts"] = self.parts_listing(real) if real.is_file() else in_folder
        return described

    def cached_family(self, real: Path) -> dict:
        """{"family": its name} or {"family": None, "error": why}: family_of, cached by the size and date of each file
        that decides it (a checkpoint and the SD2 `.yaml` beside it; a diffusers folder's index and configs), so the
        listing and each request read a model once per version of it."""
        deciding = versions(family_deciding_files(real))
        cached = self.family_cache.get(str(real))
        if cached is None or cached[0] != deciding:
            cached = self.family_cache[str(real)] = (deciding, self.described_family(real))
        return cached[1]

    def described_family(self, real: Path) -> dict:
        try:
            return {"family": self.family_of(str(real)).name}
        except ImagineError as error:
            return {"family": None, "error": error.message}
        except Exception as error:  # noqa: BLE001 (a listing must answer whatever a file holds)
            return {"family": None, "error": f"cannot be read ({type(error).__name__})"}

    def known_family(self, key: str) -> Family | None:
        """The family of the model `key` (see resolve), from the cache where its file was read before; None where
        it cannot be read."""
        path = Path(key)
        if key == DEMO_MODEL or not path.exists():
            return self.family_of(key)
        return FAMILIES.get(self.cached_family(path)["family"])

    def get(self, key: str) -> LoadedModel:
        if key in self.loaded and self.changed_beside(key):
            self.unload(key)
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

    def changed_beside(self, key: str) -> bool:
        """Whether the files beside a loaded model say otherwise now: a sidecar naming other parts, or a `.yaml` or a
        folder's config that gives it another family (whose scheduler settings it was loaded with)."""
        model = self.loaded[key]
        if sidecar_changed(model, Path(key)):
            log.info("the sidecar of %s changed: loading it again", model.name)
            return True
        if self.known_family(key) is not model.family:
            log.info("the family of %s changed: loading it again", model.name)
            return True
        return False

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
        if not path.is_file():  # a FIFO or a device would block or never end: only regular files are opened
            raise ImagineError("the model is not a regular file")
        refuse_pickles_that_could_run(path)
        header = self.readable_header(path)
        if header is not None:
            refuse_block_scaled(path, header)
            part = recognise_diffusion_model(header)
            if part is not None:
                return FAMILIES[flow_family_name(part)]
        return checkpoint_family(path, header)

    def readable_header(self, path: Path) -> dict | None:
        """A .safetensors file's header, read once for all that family detection reads there; None for a .ckpt, or a
        file whose header cannot be read, which the SD reading then refuses. A truncated file is refused here."""
        if path.suffix != ".safetensors":
            return None
        try:
            return self.headers.read(path)
        except Truncated:
            raise
        except ImagineError:
            return None

    def load(self, key: str, family: Family) -> LoadedModel:
        path = Path(key)
        sidecar = None
        if key == DEMO_MODEL:
            pipe = build_demo_pipeline(self.configs_dir / family.config)
        elif family.flow and path.is_file():
            sidecar = read_sidecar(path)
            model, parts = self.flow_parts(path)
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

    def flow_parts(self, path: Path) -> tuple:
        """(the diffusion model's Part, {component: Found}) for a flow-matching model's file."""
        model = recognise_diffusion_model(self.headers.read(path))
        folders = model_folders(self.settings.models_dir)
        return model, self.parts.find(path, model, FAMILIES[flow_family_name(model)], folders)

    def parts_listing(self, path: Path) -> dict:
        """For GET /models: the parts a flow model would load with, or what it lacks."""
        try:
            _, parts = self.flow_parts(path)
        except ImagineError as error:
            return {"missing": error.message}
        return {component: found.name for component, found in parts.items()}

    def speed_up_unet(self, pipe) -> None:
        """GPU options that pay off; attention already uses PyTorch's fused SDPA (diffusers' default)."""
        if self.device.type == "cuda":
            # Faster fp16 steps on NVIDIA GPUs by diffusers' figures; slower on a CPU, so GPUs only
            # (docs/performance.md, Figures behind the code).
            pipe.unet.to(memory_format=torch.channels_last)
        if self.settings.compile:
            # Compiles on the first generation at each new size (minutes); later steps run faster on GPUs,
            # not on a CPU (docs/performance.md, Figures behind the code), hence a setting, off by default.
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)

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


def add_cancel_points(model: LoadedModel) -> None:
    """Makes each cancel point raise Cancelled once the running job's cancelled() says so. The hooks raise before a
    module runs and no module keeps state between calls, so nothing is left half-changed for the next run."""

    def stop_if_cancelled(module, args):
        cancelled = cancel_check.get()
        if cancelled is not None and cancelled():
            raise Cancelled

    for component in model.txt2img.components.values():
        # A compiled UNet (--compile) is traced whole (fullgraph); a hook that may raise would break that.
        if isinstance(component, torch.nn.Module) and not hasattr(component, "_orig_mod"):
            for module in component.modules():
                if type(module).__name__ in CANCEL_POINTS:
                    module.register_forward_pre_hook(stop_if_cancelled)


def pipeline_options(pipe) -> dict:
    """The pipeline's own settings (klein's is_distilled), for its img2img and inpaint siblings."""
    return {"is_distilled": pipe.config.is_distilled} if "is_distilled" in pipe.config else {}


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
