"""fp8 files with a scale per weight, as ComfyUI writes them: the mixed-precision layout of its newer files
(`<layer>.weight` in fp8 beside `<layer>.weight_scale`, with `<layer>.comfy_quant` naming the format; other layers
left in bf16: `qwen_3_8b_fp8mixed.safetensors`, the text encoder of FLUX.2 klein 9B) and the older `scaled_fp8`
layout (a `scaled_fp8` marker tensor and `<layer>.scale_weight`: `t5xxl_fp8_e4m3fn_scaled.safetensors`). Such a
weight is the fp8 values times the scale; a plain cast to the compute dtype, as layerwise casting does, would drop
the scale, so these weights are multiplied out on loading."""

import torch

MARKER = "scaled_fp8"
SCALES = (".weight_scale", ".scale_weight")
# What fp8 matrix products use (the activations' scale) and the format note: casting to the compute dtype needs
# neither.
UNUSED = (".input_scale", ".scale_input", ".comfy_quant")
# The dtype a scaled weight is kept in once multiplied out: finer than fp8 (8 bits of mantissa to its 3), so the
# product loses nothing that matters, at twice the fp8 file's size.
DEQUANTISED = torch.bfloat16


def is_scaled(names) -> bool:
    """Whether tensors of these names hold scaled fp8 weights."""
    return any(name == MARKER or name.endswith(SCALES) for name in names)


def dequantised(tensors: dict) -> dict:
    """The tensors (torch tensors or safetensors slices) with each scaled weight multiplied by its scale, in
    bfloat16, and the scales, markers and format notes taken out; tensors without a scale as they were."""
    out = {}
    for name, tensor in tensors.items():
        if name == MARKER or name.endswith(SCALES + UNUSED):
            continue
        stem = name.removesuffix(".weight")
        scales = [tensors[stem + suffix] for suffix in SCALES if name.endswith(".weight") and stem + suffix in tensors]
        # [...] reads a slice whole, a 0-dimensional scale too
        out[name] = (tensor[...].float() * scales[0][...].float()).to(DEQUANTISED) if scales else tensor
    return out
