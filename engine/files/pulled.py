"""What Imagine pulled into a models folder, kept beside the models: one manifest a model in `<models>/.pulled/`,
naming the files it drew from (the model's own first), where each came from and its sha256. A pulled model is drawn
by its manifest's name; the files a manifest names are what removing the model may delete."""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from engine.errors import ImagineError

MANIFESTS = ".pulled"  # below a models folder; the listing and the part search never enter it
STAGING = ".pulling"  # below a models folder: files being fetched, moved into place once checked


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str  # what a request names it by
    folder: Path  # the models folder it was pulled into
    model: str  # its own file, below the folder: `checkpoints/dreamshaper_8.safetensors`
    files: tuple  # {"file": below the folder, "size", "sha256", "source", "revision"} for each, the model's first
    variant: str | None = None  # `z-image-turbo:bf16` for a catalog model; None for one pulled from a URL

    @property
    def path(self) -> Path:
        return self.folder / self.model


def read_manifests(folders: list) -> dict:
    """{name: Manifest} of the models pulled into the models folders, the first folder's where two name one model."""
    found = {}
    for folder in folders:
        for path in sorted((folder / MANIFESTS).glob("*.json")):
            try:
                fields = json.loads(path.read_text())
                manifest = Manifest(**{**fields, "folder": folder, "files": tuple(fields["files"])})
            except (OSError, ValueError, TypeError, KeyError):  # a damaged or foreign file: no pulled model
                continue
            found.setdefault(manifest.name, manifest)
    return found


def write_manifest(manifest: Manifest) -> None:
    """Writes the manifest whole or not at all (a temporary file, then a rename)."""
    folder = manifest.folder / MANIFESTS
    folder.mkdir(parents=True, exist_ok=True)
    fields = {**dataclasses.asdict(manifest), "files": list(manifest.files)}
    del fields["folder"]
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as file:
        json.dump(fields, file, indent=2)
    os.replace(file.name, folder / f"{manifest.name}.json")


def remove_manifest(manifest: Manifest) -> None:
    (manifest.folder / MANIFESTS / f"{manifest.name}.json").unlink(missing_ok=True)


def check_pull_name(name: str) -> None:
    """A pulled model's name becomes a file name: letters, digits and `._-` only, as the catalog's names are."""
    if not name or name.startswith(".") or any(not (char.isalnum() or char in "._-") for char in name):
        raise ImagineError(f"{name!r} cannot name a pulled model: use letters, digits, '.', '_' and '-'")
