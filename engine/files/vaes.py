"""The VAEs of the newer families, in the original BFL/LDM layout (`encoder.down.0.block.0.norm1.weight`, ...), in a
file of their own or under `vae.` in an all-in-one checkpoint: FLUX.1's `ae` (16 latent channels; Z-Image uses it
too) and FLUX.2's VAE (32, with a batch norm over 2x2-patchified latents). Recognised from the header, converted to
diffusers' names here (diffusers 0.42.1 has no single-file loader for FLUX.2's VAE) and loaded strictly."""

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2

from engine.errors import ImagineError
from engine.files.headers import Part
from engine.files.tensors import block_count, check_tensors, check_widths, read_tensors

VAE_PREFIXES = ("", "vae.")
LATENT_TYPES = {16: "ae", 32: "flux2-vae"}
MODEL_CLASSES = {"ae": AutoencoderKL, "flux2-vae": AutoencoderKLFlux2}
# What the strict load says of a file whose tensors do not fit the model (check_tensors).
REFUSALS = {
    "missing": "the VAE file lacks the tensor for {name} (diffusers' name)",
    "unexpected": "the VAE file has an unexpected tensor {name}",
    "shape": "the VAE file's tensor for {name} has shape {shape}, not {expected}",
}

# LDM's names for parts of a block -> diffusers' (the attention's 1x1 convolutions are linear layers there).
RESNET_NAMES = (("nin_shortcut.", "conv_shortcut."),)
ATTENTION_NAMES = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
# FLUX.2 keeps the quant convolutions inside encoder and decoder; LDM and diffusers at the top level.
TOP_LEVEL_NAMES = {
    "encoder.quant_conv.": "quant_conv.",
    "decoder.post_quant_conv.": "post_quant_conv.",
    "quant_conv.": "quant_conv.",
    "post_quant_conv.": "post_quant_conv.",
    "bn.": "bn.",
}


def recognise_vae(header: dict) -> Part | None:
    """The FLUX.1 `ae` or FLUX.2 VAE in a header (a VAE file, or an all-in-one checkpoint's `vae.`), or None; numbers:
    "latent_channels", "block_out_channels", "layers_per_block", "dtype". One lacking a block below its last, or of
    shapes or numbers no VAE has, is refused (422): a damaged file."""
    for prefix in VAE_PREFIXES:
        decoder_in = header.get(prefix + "decoder.conv_in.weight")
        if decoder_in is None or prefix + "encoder.down.0.block.0.conv1.weight" not in header:
            continue
        if len(decoder_in.shape) != 4:
            shape = f"a {prefix}decoder.conv_in.weight of shape {decoder_in.shape}"
            raise ImagineError(f"the file's VAE has {shape}: a damaged file", 422)
        latent_channels = decoder_in.shape[1]
        vae_type = LATENT_TYPES.get(latent_channels)
        has_batch_norm = prefix + "bn.running_var" in header
        if vae_type is None or has_batch_norm != (vae_type == "flux2-vae"):
            continue  # an SD VAE (4 channels), or a layout of neither family
        numbers = {
            "latent_channels": latent_channels,
            "block_out_channels": _block_widths(header, prefix),
            "layers_per_block": block_count(header, prefix + "encoder.down.0.block.", "conv1.weight"),
            "dtype": decoder_in.dtype,
        }
        check_widths(numbers, "VAE")
        return Part("vae", vae_type, prefix, numbers)
    return None


def load_vae(path: Path, part: Part, config_dir: Path, dtype: torch.dtype):
    """The VAE `part` of the file at `path` (AutoencoderKL for "ae", AutoencoderKLFlux2 for "flux2-vae"), built from
    the config.json in `config_dir` with the file's widths and depth, every tensor of the file in its place."""
    model_class = MODEL_CLASSES[part.type]
    config = model_class.load_config(config_dir)
    count = len(part.numbers["block_out_channels"])
    config |= {
        "latent_channels": part.numbers["latent_channels"],
        "block_out_channels": list(part.numbers["block_out_channels"]),
        "layers_per_block": part.numbers["layers_per_block"],
        "down_block_types": config["down_block_types"][:1] * count,
        "up_block_types": config["up_block_types"][:1] * count,
    }
    with torch.device("meta"):
        model = model_class.from_config(config)
    state = _diffusers_state(read_tensors(path, part.prefix), count)
    if part.type == "flux2-vae":
        # BFL's file keeps the running statistics only: the count is a training-time number.
        state.setdefault("bn.num_batches_tracked", torch.tensor(0))
    check_tensors(state, model.state_dict(), REFUSALS)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval().requires_grad_(False)


def _block_widths(header: dict, prefix: str) -> tuple:
    count = block_count(header, prefix + "encoder.down.", "block.0.conv2.weight")
    shapes = [header[f"{prefix}encoder.down.{i}.block.0.conv2.weight"].shape for i in range(count)]
    return tuple(shape[0] if shape else 0 for shape in shapes)  # a width of 0 (a scalar's) is refused as no VAE's


def _diffusers_state(tensors: dict, blocks: int) -> dict:
    """{diffusers name: tensor}; a name of no known place keeps its original name, for loading to refuse."""
    state = {}
    for name, tensor in tensors.items():
        new_name = diffusers_vae_name(name, blocks)
        if new_name is None:
            state[name] = tensor
            continue
        if ".attentions.0.to_" in new_name and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        state[new_name] = tensor
    return state


def diffusers_vae_name(name: str, blocks: int) -> str | None:
    """diffusers' name for an LDM/BFL VAE tensor name, or None for a name of no known place."""
    for old, new in TOP_LEVEL_NAMES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    match = re.match(r"(encoder|decoder)\.(.*)", name)
    if match is None:
        return None
    side, rest = match.groups()
    for pattern, place in _block_patterns(blocks):
        found = re.match(pattern, rest)
        if found:
            return f"{side}.{place(found)}"
    return None


def _block_patterns(blocks: int) -> tuple:
    """(regular expression on the name inside encoder/decoder, its diffusers name) pairs."""

    def renamed(prefix: str, rest: str, names: tuple) -> str:
        for old, new in names:
            if rest.startswith(old):
                return prefix + new + rest[len(old) :]
        return prefix + rest

    return (
        (r"(conv_in|conv_out)\.(.*)", lambda m: f"{m[1]}.{m[2]}"),
        (r"norm_out\.(.*)", lambda m: f"conv_norm_out.{m[1]}"),
        (r"mid\.block_([12])\.(.*)", lambda m: renamed(f"mid_block.resnets.{int(m[1]) - 1}.", m[2], RESNET_NAMES)),
        (r"mid\.attn_1\.(.*)", lambda m: renamed("mid_block.attentions.0.", m[1], ATTENTION_NAMES)),
        (
            r"down\.(\d+)\.block\.(\d+)\.(.*)",
            lambda m: renamed(f"down_blocks.{m[1]}.resnets.{m[2]}.", m[3], RESNET_NAMES),
        ),
        (r"down\.(\d+)\.downsample\.(.*)", lambda m: f"down_blocks.{m[1]}.downsamplers.0.{m[2]}"),
        # LDM numbers the decoder's blocks by resolution (up.0 runs last), diffusers in the order they run.
        (
            r"up\.(\d+)\.block\.(\d+)\.(.*)",
            lambda m: renamed(f"up_blocks.{blocks - 1 - int(m[1])}.resnets.{m[2]}.", m[3], RESNET_NAMES),
        ),
        (r"up\.(\d+)\.upsample\.(.*)", lambda m: f"up_blocks.{blocks - 1 - int(m[1])}.upsamplers.0.{m[2]}"),
    )
