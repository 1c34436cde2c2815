"""What the readers of model files share: the version of a file that what was read from it is kept under, the
tensors under a key prefix, numbered blocks counted from their names, the bounds on the numbers a file may build a
model with, the fp8 dtypes, and the strict check of a file's tensors against the model they load into."""

import contextlib
import re
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ImagineError

# The most numbered blocks (layers) of one kind a file may hold: far more than any model here has (FLUX.1: 19 double
# and 38 single blocks; Qwen3 8B: 36 layers; T5-XXL: 24).
MAX_BLOCKS = 256
# The widest layer a file may build (hidden widths, heads, MLPs, vocabularies): the widest here is Qwen3's vocabulary
# of 151,936; FLUX's MLPs are 12,288 wide.
MAX_WIDTH = 262_144
# The entries of diffusers' and transformers' model configs that count blocks or heads, and those that give widths
# (vocabularies and position tables too): what a diffusers folder's models are built with before a weight is read.
CONFIG_COUNTS = ("num_hidden_layers", "num_layers", "num_single_layers", "num_decoder_layers", "n_layers",
                 "n_refiner_layers", "layers_per_block", "transformer_layers_per_block", "num_attention_heads",
                 "num_key_value_heads", "num_heads", "n_heads", "n_kv_heads")  # fmt: skip
CONFIG_WIDTHS = ("hidden_size", "intermediate_size", "d_model", "d_ff", "d_kv", "head_dim", "dim", "attention_head_dim",
                 "block_out_channels", "cross_attention_dim", "joint_attention_dim", "pooled_projection_dim",
                 "projection_dim", "cap_feat_dim", "in_channels", "out_channels", "latent_channels", "vocab_size",
                 "max_position_embeddings", "axes_lens", "sample_size", "projection_class_embeddings_input_dim",
                 "addition_time_embed_dim", "timestep_guidance_channels")  # fmt: skip
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


def block_count(names, stem: str, member: str) -> int:
    """How many numbered blocks `<stem>N.` the tensor names hold (N counts from 0): one more than the highest N, where
    each block below it holds its `<stem>N.<member>`. The count builds a model, so it is refused (422) where it is
    over MAX_BLOCKS or a block below it is missing: a header naming block 999999999 of a FLUX.1 once had 10^9 blocks
    built."""
    pattern = re.compile(re.escape(stem) + r"(\d{1,9})\.")  # a longer number is no block's: loading refuses its tensor
    count = max((int(match[1]) for name in names if (match := pattern.match(name))), default=-1) + 1
    if count > MAX_BLOCKS:
        more = f"more than any model has ({MAX_BLOCKS} at most)"
        raise ImagineError(f"the file names {count} blocks {stem}N, {more}: a damaged file", 422)
    for number in range(count):
        if f"{stem}{number}.{member}" not in names:
            raise ImagineError(
                f"the file names {stem}{count - 1} but lacks {stem}{number}.{member}: a damaged or incomplete file", 422
            )
    return count


def check_widths(numbers: dict, what: str) -> None:
    """Refuses (422) a part whose numbers (read from its shapes: widths, heads, depths; whole numbers or tuples of
    them), which its model is built with, are not between 1 and MAX_WIDTH: `what` names the part."""
    for name, value in numbers.items():
        widths = value if isinstance(value, tuple) else (value,)
        if all(type(width) is int for width in widths) and not all(0 < width <= MAX_WIDTH for width in widths):
            raise ImagineError(f"the file's {what} has a {name} of {value}, which no model has: a damaged file", 422)


def check_config_numbers(config, where: str) -> None:
    """Refuses (422) a model config (`where` names it, e.g. text_encoder/config.json) that would build more than
    MAX_BLOCKS blocks or heads, a layer wider than MAX_WIDTH, or any list longer than MAX_BLOCKS entries."""
    if not isinstance(config, dict):
        raise ImagineError(f"the model folder's {where} is not a JSON object", 422)
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        items = [each for item in values for each in (item if isinstance(item, list) else [item])]  # [[1, 2], [3]]
        numbers = [each for each in items if type(each) is int]
        bound = MAX_BLOCKS if key in CONFIG_COUNTS else MAX_WIDTH if key in CONFIG_WIDTHS else None
        if len(values) > MAX_BLOCKS or (bound is not None and not all(0 <= each <= bound for each in numbers)):
            raise ImagineError(
                f"the model folder's {where} gives {key} as {str(value)[:80]}, more than any model has: a damaged file",
                422,
            )


def shape_of(tensor) -> tuple:
    """The shape of a torch tensor or a safetensors slice; a quantized GGUF weight's as it dequantizes, not its
    blocks' bytes."""
    if hasattr(tensor, "quant_shape"):
        return tuple(tensor.quant_shape)
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
