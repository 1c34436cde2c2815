"""What the readers of model files share: the version of a file that what was read from it is kept under, the
tensors under a key prefix, numbered blocks counted from their names, the fp8 dtypes, and the strict check of a
file's tensors against the model they load into."""

import contextlib
import re
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ImagineError

# safetensors' names for the fp8 dtypes, which a model may keep its weights in as the file stores them.
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def file_version(path: Path) -> tuple:
    """(path, size, modification time): what tells one version of a file from the next, so that what was read from
    it is read again once it changes. An OSError where the file cannot be found."""
    info = path.stat()
    return str(path), info.st_size, info.st_mtime_ns


def read_tensors(path: Path, prefix: str) -> dict:
    """The tensors under `prefix` in a .safetensors file, the prefix taken off; the other parts of an all-in-one file
    are not read."""
    with safe_open(path, framework="pt") as file:
        return {name: file.get_tensor(prefix + name) for name in _names_under(file, prefix)}


@contextlib.contextmanager
def tensor_slices(path: Path, prefix: str):
    """read_tensors, as slices while the file is open: each is read only when indexed (`[...]` reads it whole)."""
    with safe_open(path, framework="pt") as file:
        yield {name: file.get_slice(prefix + name) for name in _names_under(file, prefix)}


def _names_under(file, prefix: str) -> list:
    names = file.keys()  # a safe_open handle is no mapping: it cannot be iterated itself
    return [name[len(prefix) :] for name in names if name.startswith(prefix)]


def block_count(names, stem: str) -> int:
    """How many numbered blocks `<stem>N.` the tensor names hold (N counts from 0): one more than the highest N."""
    numbers = {int(match[1]) for name in names if (match := re.match(re.escape(stem) + r"(\d+)\.", name))}
    return max(numbers, default=-1) + 1


def shape_of(tensor) -> tuple:
    """The shape of a torch tensor or a safetensors slice."""
    return tuple(tensor.shape if isinstance(tensor, torch.Tensor) else tensor.get_shape())


def check_tensors(state: dict, expected: dict, refusals: dict, name=str) -> None:
    """Refuses (422) a state dict that lacks a tensor of the model (`expected`, the model's own), holds one the model
    has not, or holds one in another shape, naming the first such tensor: a strict load, in words for the client.

    The words are each loader's: `refusals` holds a template for "missing" and "unexpected" ({name}, {count}) and
    for "shape" ({name}, {shape}, {expected}); `name` turns a name in `state` into the one the message gives."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise ImagineError(refusals["missing"].format(name=name(missing[0]), count=len(missing)), 422)
    if unexpected:
        raise ImagineError(refusals["unexpected"].format(name=name(unexpected[0]), count=len(unexpected)), 422)
    for each, tensor in expected.items():
        shape, wanted = shape_of(state[each]), shape_of(tensor)
        if shape != wanted:
            raise ImagineError(refusals["shape"].format(name=name(each), shape=shape, expected=wanted), 422)
