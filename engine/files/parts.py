"""The parts a flow-matching model's file may lack (its text encoders and VAE): found in the models folders by what
their headers hold, one picked by a documented rule where several fit, and the pipeline put together from them.

The rule, in order: a sidecar `<model>.json` beside the model naming its parts ({"vae": "vae/ae", ...}); the model's
own file (ComfyUI's all-in-one checkpoints hold every part); the `text_encoders/`, `clip/` and `vae/` sub-folders of
the models folders, where among the parts that fit, the one named as its usual download is (qwen_3_4b, ae, ...), then
the first by name. A part fits when its type is the family's and its width the one the diffusion model reads."""

import dataclasses
import json
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer

from engine.errors import ImagineError
from engine.files.diffusion_models import load_diffusion_model
from engine.files.folders import (
    check_model_name,
    find_in_folders,
    read_small_json,
    real_path,
    relative_to_folders,
    walk_folders,
)
from engine.files.headers import Headers, Part
from engine.files.tensors import file_version
from engine.files.text_encoders import load_text_encoder, recognise_text_encoders
from engine.files.vaes import load_vae, recognise_vae

PART_FOLDERS = ("text_encoders", "clip", "vae")  # ComfyUI's sub-folders for them ("clip" is its older name)

# What each part type is, where it goes, and the file people download for it, for the answer that says it is missing.
DOWNLOADS = {
    "qwen3": (
        "a Qwen3 text encoder",
        "text_encoders",
        "qwen_3_4b.safetensors (8 GB; klein 9B: qwen_3_8b_fp8mixed.safetensors)",
    ),
    "t5-xxl": ("a T5-XXL text encoder", "text_encoders", "t5xxl_fp16.safetensors (9.8 GB; fp8_e4m3fn: 4.9 GB)"),
    "clip-l": ("a CLIP-L text encoder", "text_encoders", "clip_l.safetensors (246 MB)"),
    "ae": ("FLUX.1's VAE", "vae", "ae.safetensors (335 MB)"),
    "flux2-vae": ("FLUX.2's VAE", "vae", "flux2-vae.safetensors (336 MB)"),
}
USUAL_NAMES = {"qwen3": "qwen_3", "t5-xxl": "t5xxl", "clip-l": "clip_l", "ae": "ae", "flux2-vae": "flux2-vae"}


@dataclasses.dataclass(frozen=True)
class Found:
    name: str  # as the sidecar and GET /models name it: below its models folder, without .safetensors
    path: Path
    part: Part


def parts_in(header: dict) -> list:
    """The text encoders and VAE a .safetensors header holds."""
    vae = recognise_vae(header)
    return [*recognise_text_encoders(header), *([vae] if vae else [])]


def fits(part: Part, wanted: str, model: Part) -> bool:
    """Whether `part` is of the `wanted` type and as wide as the diffusion model `model` reads."""
    if part.type != wanted:
        return False
    width, numbers = part.numbers.get("width"), model.numbers
    if wanted == "qwen3":  # klein reads three of its layers side by side; Z-Image reads one
        return width * (3 if model.type == "flux2" else 1) == numbers["context_dim"]
    if wanted == "t5-xxl":
        return width == numbers["context_dim"]
    if wanted == "clip-l":
        return width == numbers["pooled_dim"]
    return part.numbers.get("latent_channels") == numbers["latent_channels"]


def describe_part(part: Part) -> str:
    width = part.numbers.get("width") or part.numbers.get("latent_channels")
    unit = "wide" if "width" in part.numbers else "latent channels"
    return f"{DOWNLOADS[part.type][0]} ({width} {unit})" if part.type in DOWNLOADS else part.type


class PartFinder:
    """Finds the parts of flow-matching models, from the headers of the part files (`headers`), each file's parts
    recognised once per version of it: a listing looks at every part file for every flow model it lists. A damaged
    file holds no part, and why is kept, for the answers that name it."""

    def __init__(self, headers: Headers):
        self.headers = headers
        # path -> (its file_version, the parts in it, why it holds none where it cannot be read): one entry a file,
        # replaced as it changes
        self.recognised = {}

    def parts_of(self, path: Path) -> list:
        return self.recognise(path)[1]

    def damage_of(self, path: Path) -> str | None:
        """Why the file at `path` holds no part where it cannot be read (a damaged or hostile file), or None."""
        return self.recognise(path)[2]

    def recognise(self, path: Path) -> tuple:
        try:
            version = file_version(path)
        except OSError:
            return (), [], None
        kept = self.recognised.get(str(path))
        if kept is None or kept[0] != version:
            try:
                kept = (version, parts_in(self.headers.read(path)), None)
            except ImagineError as error:  # not a .safetensors file, or a damaged one: no part of anything
                kept = (version, [], error.message)
            except Exception as error:  # noqa: BLE001 (one file, whatever it holds, must not fail every flow model)
                kept = (version, [], f"it cannot be read ({type(error).__name__})")
            self.recognised[str(path)] = kept
        return kept

    def candidates(self, folders: list) -> list:
        """Every part file of the models folders' part sub-folders, as Found, by name."""
        found = []
        for name, real in part_files(folders, ".safetensors"):
            found += [Found(name.removesuffix(".safetensors"), real, part) for part in self.parts_of(real)]
        return sorted(found, key=lambda each: each.name)

    def damaged(self, folders: list) -> list:
        """'name (why)' of each part file of the models folders that cannot be read."""
        files = part_files(folders, ".safetensors")
        return [f"{name.removesuffix('.safetensors')} ({why})" for name, real in files if (why := self.damage_of(real))]

    def find(self, model_path: Path, model: Part, family, folders: list) -> dict:
        """{pipeline component: Found} for each part the family needs, or a 422 naming what is missing."""
        sidecar = read_sidecar(model_path)
        inside = [Found(model_path.stem, model_path, part) for part in self.parts_of(model_path)]
        found, missing = {}, []
        candidates = None
        for component, wanted in family.parts:
            if component in sidecar:
                found[component] = self.named_part(sidecar[component], component, wanted, model, family, folders)
                continue
            fitting = [each for each in inside if fits(each.part, wanted, model)]
            if not fitting:
                candidates = self.candidates(folders) if candidates is None else candidates
                fitting = sorted(
                    (each for each in candidates if fits(each.part, wanted, model)),
                    key=lambda each: USUAL_NAMES[wanted] not in Path(each.name).name.lower(),
                )
            if fitting:
                found[component] = fitting[0]
            else:
                missing.append(wanted)
        if missing:
            ggufs = sorted(name for name, _ in part_files(folders, ".gguf"))
            others = {"ggufs": ggufs, "damaged": self.damaged(folders)}
            raise ImagineError(missing_message(model_path.stem, family, missing, candidates or [], others), 422)
        return found

    def named_part(self, name: str, component: str, wanted: str, model: Part, family, folders: list) -> Found:
        """The part a sidecar names, refused where it is not there, cannot be read or is not of the kind the model
        needs. As a request's model name, the name may only walk down the models folders: one outside them is
        refused before it is looked for, so that the answer tells nothing of what is there."""
        what = f"the sidecar's {component} {name!r}"
        if not isinstance(name, str) or not name:
            raise ImagineError(f"the sidecar's {component} must name a file in the models folders", 422)
        try:
            check_model_name(name, field=f"the sidecar's {component}")
        except ImagineError as error:  # the file's fault, not the request's
            raise ImagineError(error.message, 422) from None
        try:
            name = relative_to_folders(name, folders)
        except ImagineError:  # an absolute name outside them
            raise ImagineError(
                f'{what} is outside the models folders: name a file inside them, as "vae/ae"', 422
            ) from None
        path = find_in_folders(folders, name, (".safetensors", ".gguf"))
        real = path and real_path(path)
        if not real or not real.is_file():
            raise ImagineError(f"{what} is not in the models folders", 422)
        if path.suffix == ".gguf":
            raise gguf_part(what, wanted)
        parts = self.parts_of(real)
        for part in parts:
            if fits(part, wanted, model):
                return Found(name, real, part)
        why = self.damage_of(real)
        if why is not None:
            raise ImagineError(f"{what} cannot be read: {why}", 422)
        held = ", ".join(describe_part(part) for part in parts) or "no text encoder or VAE"
        need = DOWNLOADS[wanted][0]
        raise ImagineError(f"{what} holds {held}; {family.label} needs {need} that fits it", 422)


def gguf_part(what: str, wanted: str) -> ImagineError:
    """The refusal of a GGUF text encoder or VAE, naming the .safetensors file to use instead: transformers reads a
    GGUF text encoder only by dequantizing it whole to float32, more memory than the .safetensors file takes."""
    what_kind, folder, download = DOWNLOADS[wanted]
    return ImagineError(
        f"{what} is a GGUF file; Imagine loads {what_kind} from .safetensors only: download {download} into "
        f"{folder}/ of a models folder",
        422,
    )


def read_sidecar(model_path: Path) -> dict:
    """The parts a `<model>.json` beside the model names, {} where there is none."""
    sidecar = model_path.with_suffix(".json")
    try:
        named = read_small_json(sidecar)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise ImagineError(f"{sidecar.name} beside the model is not readable JSON", 422) from None
    if not isinstance(named, dict):
        raise ImagineError(f'{sidecar.name} must be an object such as {{"vae": "vae/ae"}}', 422)
    return named


def part_files(folders: list, suffix: str):
    """(name below its models folder, real path) of each `suffix` file in the models folders' part sub-folders."""
    for folder in folders:
        for sub in PART_FOLDERS:
            for relative, path in walk_folders([folder / sub]):
                real = real_path(path)
                if path.suffix == suffix and real is not None and real.is_file():
                    yield f"{sub}/{relative}", real


def missing_message(name: str, family, missing: list, candidates: list, others: dict) -> str:
    """What to download and where, for each missing part, and what was found that does not fit: parts of other
    kinds or widths, and the files of `others` ("ggufs": GGUF files, "damaged": 'name (why)' of damaged ones)."""
    needs = []
    for wanted in missing:
        what, folder, download = DOWNLOADS[wanted]
        needs.append(f"{what}: download {download} into {folder}/ of a models folder")
    wrong = sorted({f"{each.name} ({describe_part(each.part)})" for each in candidates})
    found = f"; found, but not fitting it: {', '.join(wrong)}" if wrong else ""
    damaged = f"; found, but damaged: {', '.join(others['damaged'])}" if others["damaged"] else ""
    ggufs = ", ".join(others["ggufs"])
    not_yet = f"; GGUF files, which Imagine loads as diffusion models only: {ggufs}" if ggufs else ""
    return f"model {name!r} ({family.label}) needs {'; and '.join(needs)}{found}{damaged}{not_yet}"


def build_flow_pipeline(family, model_path: Path, model: Part, parts: dict, config_dir: Path, dtype):
    """The family's txt2img pipeline from its diffusion model, the parts found for it and the shipped configs and
    tokenizers (config_dir: configs/<family>/); nothing is read from the network."""
    components = {
        "transformer": load_diffusion_model(model_path, model, config_dir, dtype),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir / "scheduler"),
    }
    for component, found in parts.items():
        if component == "vae":
            components["vae"] = load_vae(found.path, found.part, config_dir / "vae", dtype)
        else:
            components[component] = load_text_encoder(found.path, found.part, config_dir / component, dtype)
            tokenizer = component.replace("text_encoder", "tokenizer")
            components[tokenizer] = AutoTokenizer.from_pretrained(config_dir / tokenizer, local_files_only=True)
    # Settings of the pipeline itself (klein's is_distilled), as model_index.json holds them in a diffusers folder.
    index = json.loads((config_dir / "model_index.json").read_text())
    options = {key: value for key, value in index.items() if not key.startswith("_") and not isinstance(value, list)}
    return family.txt2img(**components, **options)
