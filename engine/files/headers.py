"""What a .safetensors or GGUF file holds, read from its header alone (names, shapes, dtypes; no tensor is loaded)
once per version of the file, and the `Part` a recogniser finds in it: a diffusion model, a text encoder or a VAE,
of one type, under one key prefix."""

import collections
import dataclasses
import mmap
import struct
import threading
from pathlib import Path

from engine.errors import ImagineError
from engine.files.gguf_files import read_gguf_header
from engine.files.header_json import parse_entries, truncated
from engine.files.tensors import file_version

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit: a longer "header" is a damaged or hostile file
# Headers kept read: a big checkpoint's takes about 1 MB of memory, and a models folder may hold hundreds of them.
HEADERS_KEPT = 32


@dataclasses.dataclass(frozen=True)
class Tensor:
    shape: tuple
    dtype: str  # safetensors' spelling: "BF16", "F16", "F32", "F8_E4M3", ...


@dataclasses.dataclass(frozen=True)
class Part:
    """One component found in a file: `kind` is "diffusion_model", "text_encoder" or "vae"; `type` what it is
    ("flux1", "qwen3", "ae", ...); `prefix` the key prefix its tensors sit under ("" in a file of its own); `numbers`
    the architecture read from the shapes (block counts, widths), which the loader builds the module with."""

    kind: str
    type: str
    prefix: str = ""
    numbers: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def read_header(path: Path) -> dict:
    """{tensor name: Tensor} from a .safetensors file's header; a file that is not one is refused, naming no path:
    Damaged where it has a header no sound file has, Truncated where it holds less than its header says."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError("header too long")
            size = file.seek(0, 2)
            if size < 8 + length:
                raise truncated(size, 8 + length)
            with mmap.mmap(file.fileno(), 8 + length, access=mmap.ACCESS_READ) as mapped:
                entries = parse_entries(mapped, 8, 8 + length)  # read as hostile input: engine/files/header_json.py
    except (OSError, struct.error, ValueError) as error:
        raise ImagineError(f"the file cannot be read as .safetensors ({type(error).__name__})", 422) from None
    end = max((end for _, _, end in entries.values()), default=0)
    if 8 + length + end > size:  # a download cut short: the header promises more than the file holds
        raise truncated(size, 8 + length + end)
    return {name: Tensor(shape, dtype) for name, (dtype, shape, _) in entries.items()}


def with_prefix(header: dict, prefix: str) -> dict:
    """The entries under `prefix`, with the prefix taken off their names."""
    return {name[len(prefix) :]: tensor for name, tensor in header.items() if name.startswith(prefix)}


def read_any_header(path: Path) -> dict:
    """read_header, or read_gguf_header for a .gguf file."""
    return read_gguf_header(path) if path.suffix == ".gguf" else read_header(path)


class Headers:
    """The headers of .safetensors and GGUF files, each read once per version of the file (read_any_header's answer,
    a refusal too), the HEADERS_KEPT most recently read kept: what family detection and the parts finder read."""

    def __init__(self):
        self.kept = collections.OrderedDict()  # file_version -> its header, or the ImagineError it was refused with
        self.lock = threading.Lock()  # the folder reader's thread and the engine's read at once

    def read(self, path: Path) -> dict:
        """read_any_header(path), from memory where this version of the file was read before."""
        try:
            version = file_version(path)
        except OSError:
            return read_any_header(path)  # not there, or not to be read: refused, naming why
        with self.lock:
            header = self.kept.pop(version, None)
        if header is None:
            try:
                header = read_any_header(path)
            except ImagineError as refusal:  # kept without its traceback, whose frames hold all that was read
                header = type(refusal)(refusal.message, refusal.status)
        with self.lock:
            self.kept[version] = header
            while len(self.kept) > HEADERS_KEPT:
                self.kept.popitem(last=False)
        if isinstance(header, ImagineError):
            raise type(header)(header.message, header.status)  # afresh: threads never raise one instance at once
        return header
