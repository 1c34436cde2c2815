"""What AUTOMATIC1111's clients read about files: model titles with their sha256 (hashed once, in the
background), the model a title names, and the generation parameters a PNG carries (POST /sdapi/v1/png-info)."""

import base64
import hashlib
import io
import logging
import os
import threading
from pathlib import Path

from PIL import Image

from engine.errors import ImagineError
from engine.fields import IMAGE_FORMATS
from engine.files.folders import CHECKPOINT_SUFFIXES, checkpoint_folders, find_in_folders, model_folders, real_path
from engine.files.tensors import file_version
from engine.infotext import infotext_strings
from engine.request import MAX_PROMPT_CHARS
from engine.settings import DEMO_MODEL

log = logging.getLogger("imagine")


class ModelHashes:
    """The sha256 of model files, which A1111's titles carry ("name.safetensors [0123456789]"). Reading a
    multi-GB file takes seconds, so each is hashed once, on a thread of its own (one at a time), and kept by
    path, size and date in the server's memory; until it is known, the model is listed without a hash, as
    A1111 lists one it has not hashed yet."""

    def __init__(self):
        self.known = {}  # file_version -> sha256
        self.queued = set()
        self.one_at_a_time = threading.Lock()  # files are read one after another, not all at once

    def get(self, path: Path) -> str | None:
        key = file_version(path)
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


def a1111_titles(catalog, hashes: ModelHashes) -> dict:
    """Every model the folders hold, by its key (see Catalog.resolve), as A1111's sd-models lists it."""
    listed = {DEMO_MODEL: {"title": DEMO_MODEL, "model_name": DEMO_MODEL, "hash": None, "sha256": None}}
    folders = checkpoint_folders(model_folders(catalog.settings.models_dir))
    for entry in catalog.listing():
        if entry.get("error") or entry["builtin"]:
            continue
        # A pulled model is titled by the name it was pulled as (its file's is beside it, in `file`).
        found = find_in_folders(folders, entry.get("file", entry["name"]), CHECKPOINT_SUFFIXES)
        real = real_path(found)
        sha256 = hashes.get(real) if real.is_file() else None
        whole = "file" in entry or entry["name"].endswith(found.suffix)  # a pulled name, or one with its suffix
        name = entry["name"] if whole else entry["name"] + found.suffix
        title = f"{name} [{sha256[:10]}]" if sha256 else name
        model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        listed[str(real)] = {"title": title, "model_name": model_name, "hash": sha256 and sha256[:10], "sha256": sha256}
        listed[str(real)]["filename"] = name  # A1111 gives the absolute path; a server path is never told
    return listed


def a1111_model_name(titles: dict, checkpoint: str) -> str:
    """The model an A1111 client names by its title, its name (with or without extension or " [hash]"),
    its model_name or its hash, as a name Catalog.resolve takes."""
    bare = without_hash(checkpoint.strip())
    for key, listed in titles.items():
        names = {listed["title"], listed["model_name"], listed.get("filename"), listed["hash"], listed["sha256"]}
        filename = listed.get("filename") or key
        if checkpoint in names or bare in names or bare == os.path.splitext(filename)[0]:
            return filename
    raise ImagineError(f"model {checkpoint!r} not found; GET /sdapi/v1/sd-models lists the models", 404)


def without_hash(title: str) -> str:
    """A title without its " [0123456789]"; read from the end, in linear time (a regex took quadratic time on long
    runs of spaces)."""
    name, bracket, digits = title.removesuffix("]").rpartition("[")
    if title.endswith("]") and bracket and digits and all(digit in "0123456789abcdef" for digit in digits):
        return name.rstrip()
    return title


def png_info(data: str) -> dict:
    """POST /sdapi/v1/png-info: a PNG's parameters text, its other text chunks, and the parameters read apart."""
    raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data, validate=False)
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Exception:  # noqa: BLE001 (any undecodable upload is the client's error)
        raise ImagineError("image is not a picture that can be read", 422) from None
    texts = {key: value for key, value in image.info.items() if isinstance(value, str)}
    info = texts.pop("parameters", "")
    if len(info) > MAX_PARAMETERS_CHARS:
        raise ImagineError(
            f"image's parameters text is {len(info)} characters long; at most {MAX_PARAMETERS_CHARS} are read", 422
        )
    return {"info": info, "items": texts, "parameters": infotext_strings(info)}


# What png-info reads: two prompts at their limit and the settings line that follows them fit well within.
MAX_PARAMETERS_CHARS = 2 * MAX_PROMPT_CHARS + 8_000
