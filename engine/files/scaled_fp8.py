"""fp8 files with a scale per weight, as ComfyUI writes them: the mixed-precision layout of its newer files
(`<layer>.weight` in fp8 beside `<layer>.weight_scale`, with `<layer>.comfy_quant` naming the format; other layers
left in bf16: `qwen_3_8b_fp8mixed.safetensors`, the text encoder of FLUX.2 klein 9B) and the older `scaled_fp8`
layout (a `scaled_fp8` marker tensor and `<layer>.scale_weight`: `t5xxl_fp8_e4m3fn_scaled.safetensors`). Such a
weight is the fp8 values times the scale; a plain cast to the compute dtype, as layerwise casting does, would drop
the scale, so these weights are multiplied out on loading. Only one scale per weight is read: ComfyUI's formats
with a scale per block (nvfp4, mxfp8) are refused, naming the format."""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ImagineError

MARKER = "scaled_fp8"
SCALES = (".weight_scale", ".scale_weight")
# What fp8 matrix products use (the activations' scale) and the format note: casting to the compute dtype needs
# neither.
UNUSED = (".input_scale", ".scale_input", ".comfy_quant")
# A format note as ComfyUI writes it: the bytes of a short JSON text, in a tensor of bytes.
NOTE_DTYPES = ("U8", "I8", torch.uint8, torch.int8)  # as a header and safetensors name them, and as torch does
MAX_NOTE_BYTES = 1024
# The dtype a scaled weight is kept in once multiplied out where the model computes in float32: finer than fp8 (8
# bits of mantissa to its 3), so the product loses nothing that matters, at twice the fp8 file's size.
DEQUANTISED = torch.bfloat16


def is_scaled(names) -> bool:
    """Whether tensors of these names hold scaled fp8 weights."""
    return any(name == MARKER or name.endswith(SCALES) for name in names)


def kept_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a scaled weight is kept in once multiplied out: the compute dtype where it is 16-bit, so that each
    weight is rounded once, from the float32 product; bfloat16 beside float32 compute, at half its memory."""
    return compute_dtype if compute_dtype.itemsize == 2 else DEQUANTISED


def dequantised(tensors: dict, dtype: torch.dtype) -> dict:
    """The tensors (torch tensors or safetensors slices) with each scaled weight multiplied by its scale in float32,
    then kept in `dtype`, and the scales, markers and format notes taken out; tensors without a scale as they were."""
    out = {}
    for name, tensor in tensors.items():
        if name == MARKER or name.endswith(SCALES + UNUSED):
            continue
        stem = name.removesuffix(".weight")
        scales = [tensors[stem + suffix] for suffix in SCALES if name.endswith(".weight") and stem + suffix in tensors]
        if not scales:
            out[name] = tensor
            continue
        scale = scales[0][...]  # [...] reads a slice whole, a 0-dimensional scale too
        if scale.numel() != 1:
            raise block_scaled(name, scale.numel(), quantised_format(tensors, stem))
        out[name] = (tensor[...].float() * scale.float()).to(dtype)
    return out


def refuse_block_scaled(path: Path, header: dict) -> None:
    """Refuses, naming its format, a file whose weights carry a scale per block of values (ComfyUI's nvfp4, whose
    4-bit values are packed two to a byte, or mxfp8), from its header: packed weights have no shape of the model's,
    so this comes before any shape is read as the architecture's."""
    for name, tensor in header.items():
        if name.endswith(SCALES) and math.prod(tensor.shape) > 1:
            stem = name.removesuffix(".weight_scale").removesuffix(".scale_weight")
            notes = {}
            if is_short_note(header.get(stem + ".comfy_quant")):
                with safe_open(path, framework="pt") as file:
                    notes = {stem + ".comfy_quant": file.get_slice(stem + ".comfy_quant")}
            raise block_scaled(f"{stem}.weight", math.prod(tensor.shape), quantised_format(notes, stem))


def block_scaled(name: str, scales: int, format_name: str) -> ImagineError:
    return ImagineError(
        f"{name} has {scales} scales, one per block (ComfyUI's {format_name} format): only fp8 files with one scale "
        "per weight are supported",
        422,
    )


def quantised_format(tensors: dict, stem: str) -> str:
    """The format a layer's `comfy_quant` note names (JSON bytes, e.g. {"format": "nvfp4"}), or "unnamed" where it has
    none, or none that is_short_note."""
    note = tensors.get(stem + ".comfy_quant")
    if not is_short_note(note):
        return "unnamed"
    try:
        return str(json.loads(bytes(note[...].tolist()))["format"])
    except (ValueError, KeyError, TypeError):
        return "unnamed"


def is_short_note(note) -> bool:
    """Whether a format note (a header's Tensor, a torch tensor or a safetensors slice; None: none) is what a note is:
    a few bytes. Read whole, a note of 50 M floats in a 200 MB file once became a Python list of 2 GB (issue 35)."""
    if note is None:
        return False
    dtype, shape = (note.get_dtype(), note.get_shape()) if hasattr(note, "get_shape") else (note.dtype, note.shape)
    return dtype in NOTE_DTYPES and math.prod(shape) <= MAX_NOTE_BYTES
