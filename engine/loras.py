"""LoRA and embedding files beside the models: found, read, loaded once per model, switched per request."""

import collections
import contextlib
import hashlib
import logging
import re
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from engine.errors import ImagineError
from engine.files.families import refuse_pickles_that_could_run
from engine.files.folders import find_in_folders, model_folders, real_path, walk_folders
from engine.files.lora_layouts import diffusers_readable, lora_family
from engine.files.tensors import file_version
from engine.logs import escaped
from engine.models import LoadedModel
from engine.prompts import CHUNK_TOKENS
from engine.settings import Settings

log = logging.getLogger("imagine")


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


EMBEDDING_SUFFIXES = (".safetensors", ".pt")


MAX_LORA_WEIGHT = 5.0


MAX_LORAS_KEPT = 8  # adapters kept loaded per model; the least recently used is deleted first


LORA_TAG = re.compile(r"<lora:([^>]*)>")


# The sub-folders each kind lives in: Imagine's and ComfyUI's names, then AUTOMATIC1111's.
KIND_FOLDERS = {"loras": ("loras", "Lora"), "embeddings": ("embeddings",)}


def extra_folders(settings: Settings, kind: str) -> list:
    """Where `loras` or `embeddings` live: those sub-folders of every models folder, in search order."""
    return [folder / sub for folder in model_folders(settings.models_dir) for sub in KIND_FOLDERS[kind]]


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
        # Where it looked, relative to the models folders: the server's own paths are not the client's business.
        kinds = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}"
        where = f"{kind}/ of the models folders (<models>/{kind}/, as {kinds})"
        raise ImagineError(f"{what} {name!r} not found in {where}; GET /{kind} lists them")
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


def lora_listing(settings: Settings) -> list:
    listing = []
    for name, path in list_files(settings, "loras", LORA_SUFFIXES).items():
        family = None
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = f.keys()  # safe_open is not iterable
                    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
                    family = lora_family(shapes, f.metadata() or {})
            except Exception:  # a broken file is listed; using it gets a 400 that says why
                family = None
        listing.append({"name": name, "size": path.stat().st_size, "family": family})
    return listing


def embedding_listing(settings: Settings) -> list:
    files = list_files(settings, "embeddings", EMBEDDING_SUFFIXES)
    return [{"name": name, "size": path.stat().st_size} for name, path in files.items()]


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


def load_lora(settings: Settings, model: LoadedModel, name: str) -> str:
    """The adapter name of LoRA `name` on `model`, loaded on first use and kept (MAX_LORAS_KEPT per model).

    A file that cannot be loaded leaves no part of itself behind: what diffusers had attached is deleted.
    """
    path = find_file(settings, "loras", "lora", name, LORA_SUFFIXES)
    key = file_version(path)
    if key in model.loras:
        model.loras.move_to_end(key)
        return model.loras[key]
    for stale in [each for each in model.loras if each[0] == key[0]]:  # the file changed: its old weights go
        delete_adapter(model, model.loras.pop(stale))
    tensors, metadata = read_tensors(path, f"lora {name!r}")
    if any("hada_" in key or "lokr_" in key for key in tensors):
        raise ImagineError(f"lora {name!r} is a LoHa/LoKr (LyCORIS) file; only LoRA files can be loaded")
    check_lora_family(name, lora_family(tensor_shapes(tensors), metadata), model)
    if len(model.loras) >= MAX_LORAS_KEPT:
        delete_adapter(model, model.loras.popitem(last=False)[1])
    adapter = f"lora{next(model.adapter_numbers)}"  # peft adapter names may not hold the dots of a file name
    pipe = model.txt2img
    try:
        with layers_left_out() as left_out:
            pipe.load_lora_weights(diffusers_readable(tensors, model.family.group), adapter_name=adapter)
        if not any(adapter in names for names in pipe.get_list_adapters().values()):
            raise ValueError("none of its layers is in this model")
        if left_out:
            verb = "is" if len(left_out) == 1 else "are"
            raise ValueError(f"{len(left_out)} of its layers {verb} not in this model: {', '.join(left_out[:3])}")
        compute_in_model_dtype(pipe, adapter)
    except Exception as error:
        if any(adapter in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(adapter)
        reason = lora_error_reason(error)
        raise ImagineError(f"lora {name!r} does not fit this model ({model.family.label}): {reason}") from error
    log.info("loaded lora %s", escaped(name))
    model.loras[key] = adapter
    model.lora_hashes[adapter] = lora_short_hash(path, metadata)
    return adapter


class LeftOutLayers(logging.Handler):
    """The layers of a LoRA that diffusers could not place in the model, from the warning that is all it gives: a
    LoRA whose converted names the model does not have loads without them (a half-loaded LoRA, refused)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.layers = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "led to unexpected keys found in the model:" in message:
            keys = message.partition(" found in the model:")[2].split(". Loading")[0].strip(" .").split(", ")
            for layer in (key.partition(".lora_")[0] for key in keys):
                if layer not in self.layers:
                    self.layers.append(layer)


@contextlib.contextmanager
def layers_left_out():
    """The list of the layers diffusers leaves out of the LoRA it loads within (see LeftOutLayers)."""
    handler, logger = LeftOutLayers(), logging.getLogger("diffusers.utils.peft_utils")
    logger.addHandler(handler)
    try:
        yield handler.layers
    finally:
        logger.removeHandler(handler)


def tensor_shapes(tensors: dict) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items() if isinstance(tensor, torch.Tensor)}


# What a LoRA's family is called in a refusal: the groups of Family.group, and "sd" for the layers SD 1.x and 2.x share.
LORA_FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sd": "Stable Diffusion 1.x/2.x",
                      "sdxl": "SDXL", "z-image": "Z-Image", "flux2": "FLUX.2", "flux1": "FLUX.1"}  # fmt: skip


def check_lora_family(name: str, family: str | None, model: LoadedModel) -> None:
    """Refuses (422) a LoRA whose file says it is for another family than the model's; one that does not say is
    tried, and refused by load_lora where its layers do not fit."""
    wanted = model.family.group
    if family is None or family == wanted or (family == "sd" and wanted in ("sd1", "sd2")):
        return
    raise ImagineError(f"lora {name!r} is for {LORA_FAMILY_LABELS[family]}; the model is {model.family.label}", 422)


def compute_in_model_dtype(pipe, adapter: str) -> None:
    """peft makes a LoRA's layers in its base layer's dtype; where the transformer keeps its layers in fp8 and
    computes in bf16 or fp32 (layerwise casting, as an fp8 file loads), the LoRA's layers must be in the dtype the
    model computes in, which diffusers reports as its dtype."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            module.lora_A[adapter].to(transformer.dtype)
            module.lora_B[adapter].to(transformer.dtype)


def delete_adapter(model: LoadedModel, adapter: str) -> None:
    model.txt2img.delete_adapters(adapter)
    del model.lora_hashes[adapter]


def lora_short_hash(path: Path, metadata: dict) -> str:
    """AUTOMATIC1111's short hash of a LoRA file, for the `Lora hashes` of a picture's parameters: the file's own
    `sshs_model_hash` where it has one, else the sha256 of what follows a .safetensors header (kohya's addnet hash;
    of the whole file for others), 12 hex digits, computed once per load."""
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
    # diffusers' words, transformers', and the asserts of diffusers' FLUX converters, which split layers by size
    if "size mismatch" in message or "mismatched_sizes" in message or isinstance(error, AssertionError):
        return "its layers have other sizes than this model's"
    if "above report" in message:  # transformers' other load errors point at a report only the log shows
        return "its layers cannot be loaded into this model; the server log has the details"
    if "not found in the base model" in message or "none of its layers" in message:
        return "none of its layers is in this model"
    return message.strip().splitlines()[0][:200] if message.strip() else type(error).__name__


def use_loras(settings: Settings, model: LoadedModel, loras: list) -> dict:
    """Switches the model's adapters to exactly the request's LoRAs at their weights (none: all off), and returns
    their short hashes by name for the picture's parameters."""
    adapters = [(load_lora(settings, model, name), weight) for name, weight in loras]
    summed = collections.Counter()  # a LoRA named twice applies once, at the sum of its weights, as A1111 does
    for adapter, weight in adapters:
        summed[adapter] += weight
    active = [(adapter, weight) for adapter, weight in summed.items() if weight != 0]
    model.active_loras = tuple(active)
    pipe = model.txt2img
    if not active:
        if model.loras:
            pipe.disable_lora()
    else:
        pipe.enable_lora()
        names, weights = zip(*active, strict=True)
        pipe.set_adapters(list(names), list(weights))
    return {name: model.lora_hashes[adapter] for (name, _), (adapter, _) in zip(loras, adapters, strict=True)}


def text_encoder_loras(model: LoadedModel) -> tuple:
    """The (adapter, weight) of each LoRA the model draws with now that has layers in a text encoder: what, beside
    the texts, changes an encoded prompt (a LoRA of the UNet or transformer alone does not)."""
    listed = model.txt2img.get_list_adapters()  # component -> the adapters with layers in it
    touching = {name for component, names in listed.items() if component.startswith("text_encoder") for name in names}
    return tuple(sorted((adapter, weight) for adapter, weight in model.active_loras if adapter in touching))


def embedding_versions(model: LoadedModel, embeddings: dict) -> tuple:
    """The file version of each of `embeddings` (prompt_embedding_vectors's), by name: a file saved again gives
    other vectors."""
    return tuple(sorted((name, model.embeddings[name][0]) for name in embeddings))


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
        if len(vectors[key]) > CHUNK_TOKENS:  # an embedding is never split across chunks, so one must hold it
            raise ImagineError(
                f"embedding {name!r} has {len(vectors[key])} vectors; at most {CHUNK_TOKENS} fit in a prompt's chunk"
            )
    return vectors


def prompt_embedding_vectors(settings: Settings, model: LoadedModel, *texts: str) -> dict:
    """The vectors of every embedding whose name the texts use as a word, each file read once per model (again once
    it changes)."""
    files = {name.lower(): path for name, path in list_files(settings, "embeddings", EMBEDDING_SUFFIXES).items()}
    used = {}
    for name, path in files.items():
        if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.I) for text in texts):
            key = file_version(path)
            if model.embeddings.get(name, (None,))[0] != key:
                model.embeddings[name] = key, embedding_vectors(name, path, model)
            used[name] = model.embeddings[name][1]
    return used
