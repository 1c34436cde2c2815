"""Where a file fetched from a URL goes in a models folder, from what its header holds (ComfyUI's sub-folders:
checkpoints/, diffusion_models/, text_encoders/, vae/, loras/, embeddings/, vae_approx/), or why Imagine will not keep
it: a web page where a file was expected, a pickle, a GGUF file of no diffusion model it draws, a file of no model it
loads."""

from pathlib import Path

from engine.errors import ImagineError
from engine.files.diffusion_models import gguf_diffusion_model, recognise_diffusion_model
from engine.files.families import FAMILY_KEY_PREFIXES
from engine.files.gguf_files import read_gguf_header
from engine.files.headers import read_header
from engine.files.scaled_fp8 import refuse_block_scaled
from engine.files.taesd import is_taesd_decoder
from engine.files.text_encoders import recognise_text_encoders
from engine.files.vaes import recognise_vae

PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
LORA_MARKS = ("lora_down", "lora_up", "lora_A", "lora_B", "lokr_", "hada_")
EMBEDDING_KEYS = ({"emb_params"}, {"clip_l", "clip_g"}, {"string_to_param"})


def folder_for(path: Path, name: str) -> str:
    """The models sub-folder the fetched file at `path`, named `name` by its server, belongs in; an ImagineError (422)
    saying why it is refused otherwise."""
    with path.open("rb") as file:
        start = file.read(512)
    if start.lstrip().lower().startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml")):
        raise ImagineError(
            f"{name!r} is a web page, not a model file: the link may need you to log in or a token (Civitai: "
            "?token=...)",
            422,
        )
    suffix = Path(name).suffix.lower()
    if suffix == ".gguf" or start.startswith(b"GGUF"):
        return gguf_folder(path, name)
    if suffix in PICKLES or suffix != ".safetensors":
        raise ImagineError(
            f"{name!r} is not a .safetensors file: Imagine pulls only those from a URL (a pickle such as .ckpt can run "
            "code as it loads); take the model's .safetensors download",
            422,
        )
    header = read_header(path)
    refuse_block_scaled(path, header)
    return header_folder(header, name)


def gguf_folder(path: Path, name: str) -> str:
    """diffusion_models, for a GGUF file of a diffusion model Imagine draws with; refused (422) otherwise."""
    if Path(name).suffix.lower() != ".gguf":  # the loaders go by the suffix
        raise ImagineError(f"{name!r} is a GGUF file under another suffix: name it .gguf", 422)
    try:
        gguf_diffusion_model(read_gguf_header(path))
    except ImagineError as error:
        raise ImagineError(f"{name!r}: {error.message}", error.status) from None
    return "diffusion_models"


def header_folder(header: dict, name: str) -> str:
    """The sub-folder for a .safetensors file of these tensors."""
    names = set(header)
    if any(mark in key for key in names for mark in LORA_MARKS):
        return "loras"
    if any(names == keys for keys in EMBEDDING_KEYS):
        return "embeddings"
    if any(key.startswith(prefix) for key in names for _, prefix in FAMILY_KEY_PREFIXES):
        return "checkpoints"
    if recognise_diffusion_model(header) is not None:
        whole = recognise_vae(header) is not None and recognise_text_encoders(header)
        return "checkpoints" if whole else "diffusion_models"
    if recognise_text_encoders(header):
        return "text_encoders"
    if recognise_vae(header) is not None:
        return "vae"
    if is_taesd_decoder(names):
        return "vae_approx"
    raise ImagineError(f"{name!r} holds no model, part, LoRA or embedding that Imagine can load", 422)
