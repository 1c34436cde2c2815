"""The models Imagine pulls by name (configs/catalog.json, GET /catalog): each model's variants and the files of each,
with where each file goes in a models folder, and which variant a bare name takes on this machine: the largest whose
files fit its memory."""

import dataclasses
import json
from pathlib import Path

from engine.errors import ImagineError
from engine.settings import CONFIGS_DIR

CATALOG = CONFIGS_DIR / "catalog.json"
# Memory a model needs to draw, for each byte of its files: the weights, held as stored (or as 16-bit where the CPU
# computes in float32 from a 16-bit file), and the activations and the decode beside them (docs/performance.md).
MEMORY_PER_BYTE = 1.25


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of the catalog: where it is on the hub and where it goes on disk (`folder`/`name`)."""

    id: str
    repo: str
    path: str  # in the repo
    folder: str  # the models sub-folder it goes to: checkpoints, diffusion_models, text_encoders, vae, ...
    name: str  # its file name there
    size: int  # bytes, as published; the hub's own answer is what a pull checks
    revision: str = "main"
    sha256: str | None = None  # where the catalog pins one; else the hub's (its LFS etag) is checked

    @property
    def destination(self) -> str:
        """Its place below a models folder, e.g. `text_encoders/qwen_3_4b.safetensors`."""
        return f"{self.folder}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way a model is published (bf16, fp8, ...): its files, the model's own first."""

    model: str
    name: str
    files: tuple

    @property
    def label(self) -> str:
        return f"{self.model}:{self.name}"

    @property
    def size(self) -> int:
        return sum(file.size for file in self.files)

    @property
    def memory(self) -> int:
        """About what it takes to draw with it, in bytes."""
        return int(self.size * MEMORY_PER_BYTE)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    description: str
    license: dict  # {"name": ..., "non_commercial": bool, "gated": bool}
    variants: dict  # variant name -> Variant, in the catalog's order


class Library:
    """The catalog, read once: its entries by name, and the variant a name takes."""

    def __init__(self, path: Path = CATALOG):
        catalog = json.loads(Path(path).read_text())
        files = {key: RemoteFile(id=key, **file_fields(spec)) for key, spec in catalog["files"].items()}
        self.entries = {}
        for spec in catalog["models"]:
            variants = {
                name: Variant(spec["name"], name, tuple(files[key] for key in keys))
                for name, keys in spec["variants"].items()
            }
            fields = {key: spec[key] for key in ("name", "family", "description", "license")}
            self.entries[spec["name"]] = Entry(**fields, variants=variants)

    def entry(self, name: str) -> Entry:
        entry = self.entries.get(name.partition(":")[0])
        if entry is None:
            known = ", ".join(self.entries)
            raise ImagineError(f"model {name!r} is not in the catalog; the names are: {known} (GET /catalog)", 404)
        return entry

    def variant(self, name: str, memory: int) -> tuple:
        """(the Variant `name` asks for, why it was taken). `name:variant` names one; a bare name takes the largest
        variant whose memory fits `memory` (the device's, in bytes), or where none does the smallest."""
        entry = self.entry(name)
        base, _, asked = name.partition(":")
        if asked:
            if asked not in entry.variants:
                choices = ", ".join(f"{base}:{variant}" for variant in entry.variants)
                raise ImagineError(f"model {name!r} has no variant {asked!r}; choose one of: {choices}", 404)
            return entry.variants[asked], f"{name} was asked for"
        by_size = sorted(entry.variants.values(), key=lambda variant: variant.size, reverse=True)
        have = f"this machine has {gigabytes(memory)} for it"
        for variant in by_size:
            if variant.memory <= memory:
                smaller = " (the largest that fits)" if len(by_size) > 1 else ""
                return variant, f"{variant.label}{smaller}: it needs about {gigabytes(variant.memory)}, {have}"
        smallest = by_size[-1]
        return smallest, f"{smallest.label}, the smallest: it needs about {gigabytes(smallest.memory)}, {have}"


def file_fields(spec: dict) -> dict:
    """A catalog file's fields, its name on disk the one in the repo where the catalog gives none."""
    return {"name": spec.get("name", spec["path"].rpartition("/")[2]), **spec}


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB"
