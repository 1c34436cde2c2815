"""The catalogue of the models on disk: a request's model name resolved to the key a model loads under, the listing
of the models folders (GET /models), each model's family, read once per version of the files that decide it, and the
parts a flow-matching model's file is drawn with. What is loaded is engine/models.py's."""

import collections
import contextlib
import logging
import time
from pathlib import Path

from engine.errors import ImagineError
from engine.files.diffusion_models import gguf_diffusion_model, recognise_diffusion_model
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
from engine.files.gguf_files import quant_name
from engine.files.header_json import Damaged
from engine.files.headers import Headers
from engine.files.parts import PartFinder
from engine.files.pulled import read_manifests
from engine.files.scaled_fp8 import refuse_block_scaled
from engine.files.tensors import file_version
from engine.logs import escaped
from engine.settings import DEMO_MODEL, Settings

log = logging.getLogger("imagine")

FALLBACKS_KEPT = 64  # unknown model names remembered as told once in the log; older ones are told again


class Catalog:
    """What models there are: found by name, listed, and their families and parts read once per version of their
    files. `loaded` holds the keys of the models loaded now (Models.loaded), which the listing marks."""

    def __init__(self, settings: Settings, loaded):
        self.settings = settings
        self.loaded = loaded
        self.default = settings.model  # the model a request that names none gets; A1111 clients may switch it
        self.fallen_back = collections.OrderedDict()  # names resolve_or_default logged as drawn by the default
        self.family_cache = {}  # path -> (the versions of the files deciding its family, what was read there)
        self.headers = Headers()
        self.parts = PartFinder(self.headers)
        self.reader = FolderReader(settings.folder_timeout)

    def resolve(self, name: str | None) -> str:
        """Turns a request's model name into the key it is loaded and cached under: 'demo', a path, or a hub repo id.

        The name comes from the network, so it may only name entries of the models folders (see
        check_model_name); links inside them are followed. Only the configured default model may live elsewhere.
        """
        configured = name is None or name == self.default
        name = self.default if name is None else name
        if name == DEMO_MODEL:
            return DEMO_MODEL
        if (pulled := self.pulled_model(name)) is not None:
            return str(pulled)
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
            raise ImagineError(f"model {name!r} is not a .safetensors, .gguf or .ckpt file or a diffusers folder")
        if self.settings.allow_downloads and is_repo_id(name):
            return name
        raise ImagineError(
            f"model {name!r} not found in the models folders (--models-dir, IMAGINE_MODELS_DIR); "
            "GET /models lists the models a request can name, 'demo' (built in) among them",
            404,
        )

    def pulled_model(self, name: str) -> Path | None:
        """The real path of the model pulled as `name` (engine/pull.py), or None where none was, or its file is gone."""
        return next((real for real, manifest in self.pulled_files().items() if manifest.name == name), None)

    def resolve_or_default(self, name: str | None) -> str:
        """resolve(), with the default model for a name the folders lack (clients of OpenAI's API send dall-e-3)."""
        try:
            return self.resolve(name)
        except ImagineError as error:
            if error.status != 404:
                raise
        if name not in self.fallen_back:
            log.info(
                "model '%s' is not here; the default model '%s' draws instead",
                escaped(str(name)[:80]),
                escaped(self.default),
            )
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
        pulled = self.pulled_files()
        for relative, path in walk_folders(folders, skip=NOT_CHECKPOINTS):
            real = real_path(path)
            if real is None or not is_model_entry(path, real):
                continue
            name = model_name(folders, relative, real)
            if name is None:  # an entry of a later folder that an earlier one's entry of the same name hides
                continue
            entry = {"name": name}
            if real in pulled:  # drawn by the name it was pulled as; its own file's name beside it
                entry = {"name": pulled[real].name, "file": name, "pulled": pulled[real].variant}
            try:
                described = self.describe(real)
            except OSError as error:  # e.g. a folder inside it that this server's user may not read
                described = {"family": None, "error": f"cannot be read ({error.strerror})", "size": 0, "modified": None}
            listed.append({**entry, **described, "loaded": str(real) in self.loaded, "builtin": False})
        return listed

    def files_in_use(self, but: Path | None) -> set:
        """The real paths every model on disk but `but` draws from: its own file or folder and, for a flow model's
        file, the parts it finds (what removing a pulled model must keep). Read on the folder reader's thread."""
        used = set()
        for _, path in walk_folders(checkpoint_folders(model_folders(self.settings.models_dir)), skip=NOT_CHECKPOINTS):
            real = real_path(path)
            if real is None or real == but or not is_model_entry(path, real):
                continue
            used.add(real)
            family = FAMILIES.get(self.cached_family(real)["family"])
            if family is not None and family.flow and real.is_file():
                with contextlib.suppress(ImagineError):  # a model that lacks a part keeps none
                    used |= {found.path for found in self.flow_parts(real)[1].values()}
        return used

    def pulled_files(self) -> dict:
        """{real path of its file: Manifest} of each pulled model whose file is there."""
        folders = model_folders(self.settings.models_dir)
        found = {}
        for manifest in read_manifests(folders).values():
            path = find_in_folders(folders, manifest.model)
            if path is not None and (real := real_path(path)) is not None:
                found[real] = manifest
        return found

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
            if real.suffix == ".gguf":
                described["quant"] = self.gguf_quant(real)
        return described

    def gguf_quant(self, real: Path) -> str:
        """The quant type of a GGUF diffusion model, for GET /models."""
        header = self.headers.read(real)
        return quant_name(header, recognise_diffusion_model(header).numbers["dtype"])

    def cached_family(self, real: Path) -> dict:
        """{"family": its name} or {"family": None, "error": why}: the verdict on the model, as the listing gives it."""
        verdict = self.verdict(real)
        if isinstance(verdict, ImagineError):
            return {"family": None, "error": verdict.message}
        return {"family": verdict.name}

    def verdict(self, real: Path) -> Family | ImagineError:
        """family_of, or the ImagineError it refuses with, cached by the size and date of each file that decides it (a
        checkpoint and the SD2 `.yaml` beside it; a diffusers folder's index and configs), so that the listing and
        each request read a model once per version of it, a damaged or hostile one too."""
        deciding = versions(family_deciding_files(real))
        cached = self.family_cache.get(str(real))
        if cached is None or cached[0] != deciding:
            cached = self.family_cache[str(real)] = (deciding, self.described_family(real))
        return cached[1]

    def described_family(self, real: Path) -> Family | ImagineError:
        try:
            return self.family_of(str(real))
        except ImagineError as error:  # kept without its traceback, whose frames hold all that was read
            return ImagineError(error.message, error.status)
        except Exception as error:  # noqa: BLE001 (a listing must answer whatever a file holds)
            return ImagineError(f"cannot be read ({type(error).__name__})", 422)

    def known_family(self, key: str) -> Family | None:
        """The family of the model `key` (see resolve), from the cache where its file was read before; None where
        it cannot be read."""
        path = Path(key)
        if key == DEMO_MODEL or not path.exists():
            return self.family_of(key)
        verdict = self.verdict(path)
        return None if isinstance(verdict, ImagineError) else verdict

    def checked_family(self, key: str) -> Family:
        """The family of the model `key` (see resolve), from the cache where its file was read before; what it was
        refused with raised (afresh: threads never raise one instance at once) where it cannot be loaded."""
        path = Path(key)
        if key == DEMO_MODEL or not path.exists():
            return self.family_of(key)
        verdict = self.verdict(path)
        if isinstance(verdict, ImagineError):
            raise ImagineError(verdict.message, verdict.status)
        return verdict

    def family_of(self, key: str) -> Family:
        """The model's family, from a glance at the file or folder; refuses what cannot be loaded."""
        path = Path(key)
        if key == DEMO_MODEL or not path.exists():  # the demo, or a hub repo id (downloads allowed)
            return FAMILIES["sd1"]
        if path.is_dir():
            return folder_family(path)
        if not path.is_file():  # a FIFO or a device would block or never end: only regular files are opened
            raise ImagineError("the model is not a regular file")
        if path.suffix == ".gguf":
            return self.gguf_family(path)
        refuse_pickles_that_could_run(path)
        header = self.readable_header(path)
        if header is not None:
            refuse_block_scaled(path, header)
            part = recognise_diffusion_model(header)
            if part is not None:
                return FAMILIES[flow_family_name(part)]
        return checkpoint_family(path, header)

    def gguf_family(self, path: Path) -> Family:
        """The family of a GGUF file's diffusion model; a file Imagine cannot draw with is refused (422), naming it."""
        try:
            return FAMILIES[flow_family_name(gguf_diffusion_model(self.headers.read(path)))]
        except ImagineError as error:
            raise ImagineError(f"{path.name}: {error.message}", error.status) from None

    def readable_header(self, path: Path) -> dict | None:
        """A .safetensors file's header, read once for all that family detection reads there; None for a .ckpt, or a
        file with no header to read, which the SD reading then refuses. A truncated or damaged file (Damaged) is
        refused here: no other reader is to try it again."""
        if path.suffix != ".safetensors":
            return None
        try:
            return self.headers.read(path)
        except Damaged:
            raise
        except ImagineError:
            return None

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


def versions(paths: list) -> tuple:
    """The file_version of each file, () for one that is not there (a checkpoint without a `.yaml` beside it)."""
    found = []
    for path in paths:
        try:
            found.append(file_version(path))
        except OSError:
            found.append(())
    return tuple(found)
