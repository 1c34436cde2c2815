"""GGUF files, llama.cpp's format, as ComfyUI-GGUF (city96) and stable-diffusion.cpp write diffusion models: the
original key names, each tensor's dimensions stored innermost first, its weights in blocks of a quant type (Q8_0,
Q4_K, ...). The header is read as hostile input, bounded and checked against the file's size, into the names,
shapes and quant types of its tensors; the tensors are read still quantized (diffusers' GGUFParameter), for
diffusers' GGUF layers to dequantize one layer at a time as they compute."""

import dataclasses
import mmap
import struct
from pathlib import Path

import gguf
import torch
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

from engine.errors import ImagineError
from engine.files.header_json import truncated

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023) had 32-bit counts; no diffusion model was written in it
MAX_HEADER_BYTES = 100 * 1024 * 1024  # as for .safetensors: an LLM's header, its vocabulary and all, takes a few MB
MAX_TENSORS = 65_536  # FLUX.1 has 780 tensors, a large LLM about 2,000: more is a damaged or hostile file
MAX_ENTRIES = 65_536  # metadata entries: an LLM's file has about 40
WANTED = ("general.architecture", "general.alignment", "general.file_type")  # the metadata read; the rest is skipped
MAX_ARRAY = 1 << 20  # the longest metadata array: an LLM's vocabulary (up to 262,144 tokens) and its scores
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32  # where the tensor data starts, and each tensor within it, unless general.alignment says
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# The quant types kept in memory as plain torch tensors; diffusers dequantizes every other type it supports.
TORCH_TYPES = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}
LOADABLE = set(TORCH_TYPES) | set(SUPPORTED_GGUF_QUANT_TYPES)
LOADABLE_NAMES = {kind.name for kind in LOADABLE}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """A tensor of a GGUF file, read as a .safetensors header's Tensor is (engine/files/headers.py): `shape` in
    torch's order, `dtype` its quant type's name ("Q8_0", "F16", ...); and where its bytes lie in the file."""

    shape: tuple
    dtype: str
    offset: int
    nbytes: int


class GGUFHeader(dict):
    """{name: GGUFTensor}, in the file's order, as the recognisers read a .safetensors header; with the file's
    `architecture` (general.architecture: "flux" and "lumina2" in ComfyUI-GGUF's files, "qwen3" in an LLM's) and
    `file_type` (general.file_type, llama.cpp's LlamaFileType: MOSTLY_Q4_K_S, ...) beside, None where not given."""

    def __init__(self, tensors: dict, architecture: str | None, file_type: int | None):
        super().__init__(tensors)
        self.architecture, self.file_type = architecture, file_type


class Cursor:
    """Reads a GGUF header from the start of `data`, never past `end`: a struct.error or ValueError where it would."""

    def __init__(self, data, end: int):
        self.data, self.at, self.end = data, 0, end

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.skip(struct.calcsize(fmt))
        return value

    def skip(self, length: int) -> None:
        if self.at + length > self.end:
            raise ValueError("the header runs past its bound")
        self.at += length

    def string(self) -> str:
        length = self.take("<Q")
        start = self.at
        self.skip(length)
        return bytes(self.data[start : self.at]).decode("utf-8", "replace")

    def value(self, kind: int):
        """The value of metadata type `kind`; an array is skipped (None): nothing read here needs one."""
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        item, count = self.take("<I"), self.take("<Q")
        if count > MAX_ARRAY:
            raise ValueError(f"a metadata array of {count} items")
        if item in SCALARS:
            self.skip(count * struct.calcsize(SCALARS[item]))
        elif item == STRING:
            for _ in range(count):
                self.skip(self.take("<Q"))
        else:  # arrays of arrays: written by no converter of diffusion models
            raise ValueError(f"a metadata array of type {item}")
        return None


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata Imagine reads and the tensors of a GGUF file; one that is not a sound GGUF file is refused (422),
    naming no path: Truncated where it holds less than its header says (a download cut short)."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            if size < 24:  # magic, version and the two counts
                raise ValueError(f"{size} bytes, fewer than a GGUF header's")
            _check_start(file)
            end = min(size, MAX_HEADER_BYTES)
            with mmap.mmap(file.fileno(), end, access=mmap.ACCESS_READ) as mapped:
                header = _parse(Cursor(mapped, end))
    except (OSError, struct.error, ValueError, OverflowError) as error:
        raise ImagineError(f"the file cannot be read as GGUF ({error})", 422) from None
    for tensor in header.values():
        if tensor.offset + tensor.nbytes > size:
            raise truncated(size, tensor.offset + tensor.nbytes)
    return header


def _check_start(file) -> None:
    file.seek(0)
    magic, version = struct.unpack("<4sI", file.read(8))
    if magic != MAGIC:
        raise ValueError("it does not start as GGUF files do")
    if version not in VERSIONS:
        raise ValueError(f"GGUF version {version}; Imagine reads versions 2 and 3")


def _parse(cursor: Cursor) -> GGUFHeader:
    cursor.skip(8)  # magic and version, read by _check_start
    count, entries = cursor.take("<Q"), cursor.take("<Q")
    if count > MAX_TENSORS or entries > MAX_ENTRIES:
        raise ValueError(f"{count} tensors and {entries} metadata entries")
    metadata = {}
    for _ in range(entries):
        key = cursor.string()
        value = cursor.value(cursor.take("<I"))
        if key in WANTED:
            metadata[key] = value
    infos = [_tensor_info(cursor) for _ in range(count)]
    alignment = metadata.get("general.alignment") or DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment & (alignment - 1):
        raise ValueError(f"an alignment of {alignment}")
    start = -(-cursor.at // alignment) * alignment
    tensors = {name: GGUFTensor(shape, kind, start + offset, nbytes) for name, shape, kind, offset, nbytes in infos}
    architecture, file_type = metadata.get("general.architecture"), metadata.get("general.file_type")
    return GGUFHeader(
        tensors,
        architecture if isinstance(architecture, str) else None,
        file_type if isinstance(file_type, int) else None,
    )


def _tensor_info(cursor: Cursor) -> tuple:
    """(name, torch shape, quant type's name, offset in the data, size in bytes) of the next tensor."""
    name = cursor.string()
    dims_count = cursor.take("<I")
    if not 0 < dims_count <= MAX_DIMS:
        raise ValueError(f"tensor {name} has {dims_count} dimensions")
    dims = [cursor.take("<Q") for _ in range(dims_count)]
    number, offset = cursor.take("<I"), cursor.take("<Q")
    try:
        kind = gguf.GGMLQuantizationType(number)
    except ValueError:
        raise ValueError(f"tensor {name} is of unknown quant type {number}") from None
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    if dims[0] % block or not all(0 < dim < 1 << 40 for dim in dims):
        raise ValueError(f"tensor {name} of {kind.name} cannot be {dims} wide")
    elements = 1
    for dim in dims:
        elements *= dim
    return name, tuple(reversed(dims)), kind.name, offset, elements // block * block_bytes


def unloadable_types(tensors: dict) -> list:
    """'name (type)' of each tensor of a quant type diffusers cannot dequantize."""
    return [f"{name} ({t.dtype})" for name, t in tensors.items() if gguf.GGMLQuantizationType[t.dtype] not in LOADABLE]


def quant_name(header: GGUFHeader, weights: str) -> str:
    """The quant type as people name the file: llama.cpp's file type (Q4_K_S) where the file gives one of its big
    weights' type, else `weights`, that type (Q8_0). ComfyUI-GGUF's convert.py writes the weights' GGML type number
    as the file type, which llama.cpp's numbering reads as another type (its Q8_0 files would say Q5_0)."""
    try:
        named = gguf.LlamaFileType(header.file_type).name.removeprefix("MOSTLY_")
    except ValueError:  # none given, or one this gguf package does not know
        return weights
    return named if named.startswith(weights) else weights


def read_gguf_tensors(path: Path, prefix: str) -> dict:
    """The tensors under `prefix` in a GGUF file, the prefix taken off: F32, F16 and BF16 ones as torch tensors, the
    quantized ones as GGUFParameter (their blocks' bytes, a row per row of the weight). A quant type diffusers cannot
    dequantize is refused (422), named."""
    tensors = {name[len(prefix) :]: t for name, t in read_gguf_header(path).items() if name.startswith(prefix)}
    unloadable = unloadable_types(tensors)
    if unloadable:
        raise ImagineError(f"the file holds tensors of quant types Imagine cannot compute with: {unloadable[0]}", 422)
    with open(path, "rb") as file:
        return {name: _read_tensor(file, tensor) for name, tensor in tensors.items()}


def _read_tensor(file, tensor: GGUFTensor) -> torch.Tensor:
    data = torch.empty(tensor.nbytes, dtype=torch.uint8)
    file.seek(tensor.offset)
    if file.readinto(data.numpy()) != tensor.nbytes:  # the file shrank since its header was read
        raise ImagineError("the file is shorter than its header says: a download that did not finish?", 422)
    kind = gguf.GGMLQuantizationType[tensor.dtype]
    if kind in TORCH_TYPES:
        return data.view(TORCH_TYPES[kind]).reshape(tensor.shape)
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows = data.reshape(*tensor.shape[:-1], tensor.shape[-1] // block * block_bytes)
    return GGUFParameter(rows, quant_type=kind)
