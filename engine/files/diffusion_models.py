"""The diffusion models (transformers) of FLUX.1, FLUX.2 (klein) and Z-Image, read from the files people download:
recognised from a .safetensors or GGUF header in their original key layout (BFL's for FLUX, the one ComfyUI's Z-Image
files use), in a file of their own or under ComfyUI's `model.diffusion_model.` prefix, and loaded into diffusers'
classes with diffusers' own key converters, strictly, from a shipped config folder, with no network; a GGUF file's
weights stay quantized in memory, in diffusers' GGUF layers."""

import json
from pathlib import Path

import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    GGUFQuantizationConfig,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_z_image_transformer_checkpoint_to_diffusers,
)
from diffusers.quantizers.gguf.gguf_quantizer import GGUFQuantizer
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor
from diffusers.utils import get_module_from_name

from engine.errors import ImagineError
from engine.files.gguf_files import LOADABLE_NAMES, GGUFHeader, read_gguf_tensors, unloadable_types
from engine.files.headers import Part, with_prefix
from engine.files.scaled_fp8 import dequantised, is_scaled, kept_dtype
from engine.files.tensors import FP8_DTYPES, block_count, check_tensors, read_tensors

PREFIXES = ("", "model.diffusion_model.")  # a file of its own; a ComfyUI all-in-one checkpoint
FLUX_PATCH = 4  # FLUX packs 2x2 latent pixels into one token: in_channels = 4 x the VAE's latent channels
Z_IMAGE_PATCH = 4  # Z-Image patches 2x2 too (all_patch_size 2, all_f_patch_size 1: the only layout it was released in)
FLUX1_WIDTH = 3072  # the width diffusers' FLUX.1 converter splits fused single-block projections at, whatever the file

CLASSES = {"flux1": FluxTransformer2DModel, "flux2": Flux2Transformer2DModel, "z-image": ZImageTransformer2DModel}
FAMILY_NAMES = {"flux1": "FLUX.1", "flux2": "FLUX.2", "z-image": "Z-Image"}
# What the strict load says of a file whose tensors do not fit the model (check_tensors).
REFUSALS = {
    "missing": "the diffusion model lacks {count} tensor(s), e.g. {name}",
    "unexpected": "the diffusion model holds {count} unknown tensor(s), e.g. {name}",
    "shape": "the diffusion model's tensor {name} is {shape}, the architecture's {expected}",
}


def recognise_diffusion_model(header: dict) -> Part | None:
    """The FLUX.1, FLUX.2 or Z-Image transformer in a header (as `read_header` gives it), with the numbers it is built
    with; None where there is none."""
    for prefix in PREFIXES:
        tensors = with_prefix(header, prefix)
        for kind, (markers, numbers_of) in RECOGNISERS.items():
            if not markers <= tensors.keys():
                continue
            try:
                numbers = numbers_of(tensors)
            except (ValueError, IndexError, ZeroDivisionError):  # the right names with shapes no model has: damaged
                numbers = None
            if numbers is not None:
                return Part("diffusion_model", kind, prefix, numbers)
    return None


def gguf_diffusion_model(header: GGUFHeader) -> Part:
    """The diffusion model of a GGUF file (read_gguf_header's answer); a 422 saying what the file holds where that is
    no model Imagine draws with (an LLM's GGUF, say), or where its weights are of a quant type it cannot compute
    with."""
    part = recognise_diffusion_model(header)
    if part is None:
        held = f"a {header.architecture!r} model" if header.architecture else "no model Imagine knows"
        raise ImagineError(
            f"the GGUF file holds {held}, not the diffusion model of FLUX.1, FLUX.2 klein or Z-Image; a text encoder's "
            "GGUF does not go in the models' folders (and Imagine loads text encoders from .safetensors only)",
            422,
        )
    unloadable = unloadable_types(with_prefix(header, part.prefix))
    if unloadable:
        loadable = ", ".join(sorted(LOADABLE_NAMES))
        raise ImagineError(
            f"the GGUF file holds {len(unloadable)} tensor(s) of a quant type Imagine cannot compute with, e.g. "
            f"{unloadable[0]}; it computes with {loadable}",
            422,
        )
    return part


def flux_numbers(tensors: dict) -> dict:
    """The numbers of a FLUX.1 or FLUX.2: blocks, widths, the head width from a q norm's scale."""
    hidden, in_channels = tensors["img_in.weight"].shape
    head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    numbers = {
        "in_channels": in_channels,
        "latent_channels": in_channels // FLUX_PATCH,
        "context_dim": tensors["txt_in.weight"].shape[1],
        "guidance": "guidance_in.in_layer.weight" in tensors,
        # the big matrices' dtype: an fp8 file may keep its biases and norms in bf16
        "dtype": tensors["double_blocks.0.img_attn.qkv.weight"].dtype,
        "scaled": is_scaled(tensors),
        "double_blocks": block_count(tensors, "double_blocks.", "img_attn.qkv.weight"),
        "single_blocks": block_count(tensors, "single_blocks.", "linear1.weight"),
        "hidden": hidden,
        "heads": hidden // head_dim,
        "head_dim": head_dim,
    }
    if "vector_in.in_layer.weight" in tensors:  # FLUX.1's CLIP pooled vector
        numbers["pooled_dim"] = tensors["vector_in.in_layer.weight"].shape[1]
    return numbers


def z_image_numbers(tensors: dict) -> dict | None:
    """The numbers of a Z-Image; None for Lumina 2, which shares its layout but modulates from 1024 features, not
    Z-Image's 256."""
    hidden, patch_features = tensors["x_embedder.weight"].shape
    if tensors["layers.0.adaLN_modulation.0.weight"].shape[1] != min(hidden, 256):
        return None
    head_dim = tensors["layers.0.attention.q_norm.weight"].shape[0]
    return {
        "in_channels": patch_features // Z_IMAGE_PATCH,
        "latent_channels": patch_features // Z_IMAGE_PATCH,
        "context_dim": tensors["cap_embedder.1.weight"].shape[1],
        "guidance": False,
        "dtype": tensors["layers.0.attention.qkv.weight"].dtype,
        "scaled": is_scaled(tensors),
        "layers": block_count(tensors, "layers.", "attention.qkv.weight"),
        "refiner_layers": block_count(tensors, "noise_refiner.", "attention.qkv.weight"),
        "hidden": hidden,
        "heads": hidden // head_dim,
        "head_dim": head_dim,
    }


FLUX_MARKERS = {
    "img_in.weight",
    "txt_in.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_attn.norm.query_norm.scale",
}
RECOGNISERS = {  # type: (the tensors it must hold, all that its numbers are read from; its numbers)
    # FLUX.2 shares one modulation across all single blocks (the tensor diffusers detects it by)
    "flux2": (FLUX_MARKERS | {"single_stream_modulation.lin.weight"}, flux_numbers),
    # FLUX.1 modulates each double block itself and takes CLIP's pooled vector (Chroma, its offshoot, does neither)
    "flux1": (FLUX_MARKERS | {"double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight"}, flux_numbers),
    "z-image": (
        {
            "x_embedder.weight",
            "x_pad_token",
            "cap_embedder.1.weight",
            "layers.0.adaLN_modulation.0.weight",
            "layers.0.attention.qkv.weight",
            "layers.0.attention.q_norm.weight",
        },
        z_image_numbers,
    ),
}


def load_diffusion_model(path: Path, part: Part, config_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers transformer `part` names in the file at `path`, built from `config_dir`'s transformer config
    with the file's block counts, in eval mode. Weights load as `dtype`; an fp8 file's stay fp8 and compute in
    `dtype` (a scaled fp8 file's are multiplied out: engine/files/scaled_fp8.py). A file that does not fit the config is
    refused (422), naming what did not fit."""
    if path.suffix == ".gguf":
        return load_gguf_model(path, part, config_dir, dtype)
    config = fitted_config(part, config_dir)
    storage = storage_dtype(part, dtype)
    with torch.device("meta"):  # no memory for weights the file replaces anyway
        model = CLASSES[part.type].from_config(config).to(dtype)
    if storage is not None:
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)
    expected = model.state_dict()
    state = to_diffusers(part, dequantised(read_tensors(path, part.prefix), kept_dtype(dtype)))
    check_tensors(state, expected, REFUSALS)
    # each tensor in the dtype the model keeps it in: fp8 where layerwise casting stores it so, `dtype` elsewhere
    model.load_state_dict({name: state[name].to(expected[name].dtype) for name in expected}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_gguf_model(path: Path, part: Part, config_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """quantized_model, a file that does not fit refused (422) naming it."""
    try:
        return quantized_model(path, part, fitted_config(part, config_dir), dtype)
    except ImagineError as error:
        raise ImagineError(f"{path.name}: {error.message}", error.status) from None


def quantized_model(path: Path, part: Part, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of a GGUF file, as diffusers' GGUF quantizer builds it: each linear layer whose weight the file
    quantizes becomes a GGUFLinear keeping that weight's blocks and dequantizing it to `dtype` as it computes; every
    other tensor (the file's F32/F16/BF16 ones) is kept in `dtype`. Checked whole before a weight is placed."""
    with torch.device("meta"):
        model = CLASSES[part.type].from_config(config).to(dtype)
    state = to_diffusers(part, read_gguf_tensors(path, part.prefix))
    check_tensors(state, model.state_dict(), REFUSALS)
    quantizer = GGUFQuantizer(GGUFQuantizationConfig(compute_dtype=dtype))
    quantizer.preprocess_model(model, device_map=None, keep_in_fp32_modules=[], state_dict=state)
    quantized = {}
    for name, tensor in state.items():
        module, _ = get_module_from_name(model, name)
        if isinstance(module, GGUFLinear) and name.endswith(".weight"):
            quantized[name] = tensor
        else:  # a norm or bias quantized too: dequantized once, as no GGUF layer computes with it
            state[name] = dequantize_gguf_tensor(tensor).to(dtype)
    model.load_state_dict({n: t for n, t in state.items() if n not in quantized}, strict=False, assign=True)
    for name, tensor in quantized.items():
        quantizer.create_quantized_param(model, tensor, name, torch.device("cpu"))
    model.hf_quantizer = quantizer
    return model.eval().requires_grad_(False)


def storage_dtype(part: Part, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the big weights are kept in where it is narrower than `dtype`, the one they compute in: an fp8
    file's fp8, a scaled fp8 file's bfloat16 beside float32 (engine/files/scaled_fp8.py); None where they are kept in
    `dtype`."""
    storage = kept_dtype(dtype) if part.numbers["scaled"] else FP8_DTYPES.get(part.numbers["dtype"])
    return storage if storage is not None and storage.itemsize < dtype.itemsize else None


def fitted_config(part: Part, config_dir: Path) -> dict:
    """The config to build `part` with: the folder's, with the file's block counts and guidance embedder (pruned
    and distilled variants differ in those), after checking that the widths agree. A family released in several
    widths has a config for each beside the first (`transformer/`, `transformer-9b/` for FLUX.2 klein 4B and 9B):
    the one the file's widths fit is taken."""
    folders = [config_dir / "transformer", *sorted(config_dir.glob("transformer-*"))]
    configs = [json.loads((folder / "config.json").read_text()) for folder in folders]
    for config in configs:
        wanted = CLASSES[part.type].__name__
        if config.get("_class_name") != wanted:
            raise ImagineError(
                f"the diffusion model is {FAMILY_NAMES[part.type]}, but the {config_dir.name} configuration is for "
                f"{config.get('_class_name')}",
                422,
            )
        if all(found == configured for found, configured in widths(part, config).values()):
            return {**config, **block_numbers(part)}
    mismatches = []
    for folder, config in zip(folders, configs, strict=True):
        what, (found, configured) = next(
            (what, pair) for what, pair in widths(part, config).items() if pair[0] != pair[1]
        )
        size = folder.name.removeprefix("transformer").removeprefix("-")
        whose = f"{size}'s" if size else "the architecture's"
        mismatches.append(f"its {what} is {found} where {whose} is {configured}")
    raise ImagineError(
        f"the diffusion model does not fit the {config_dir.name} architecture: {'; '.join(mismatches)}", 422
    )


def widths(part: Part, config: dict) -> dict:
    """{what: (the file's, the config's)} for each width the file must share with the config."""
    numbers = part.numbers
    if part.type == "z-image":
        return {
            "hidden width": (numbers["hidden"], config["dim"]),
            "number of heads": (numbers["heads"], config["n_heads"]),
            "text feature width": (numbers["context_dim"], config["cap_feat_dim"]),
            "input channels": (numbers["in_channels"], config["in_channels"]),
        }
    flux = {
        "hidden width": (numbers["hidden"], config["num_attention_heads"] * config["attention_head_dim"]),
        "number of heads": (numbers["heads"], config["num_attention_heads"]),
        "text feature width": (numbers["context_dim"], config["joint_attention_dim"]),
        "input channels": (numbers["in_channels"], config["in_channels"]),
    }
    if part.type == "flux1":
        flux["pooled text width"] = (numbers["pooled_dim"], config["pooled_projection_dim"])
    return flux


def block_numbers(part: Part) -> dict:
    """The config entries the file's own numbers give: its block counts, and FLUX's guidance embedder."""
    numbers = part.numbers
    if part.type == "z-image":
        return {"n_layers": numbers["layers"], "n_refiner_layers": numbers["refiner_layers"]}
    return {
        "num_layers": numbers["double_blocks"],
        "num_single_layers": numbers["single_blocks"],
        "guidance_embeds": numbers["guidance"],
    }


def to_diffusers(part: Part, tensors: dict) -> dict:
    """The tensors under diffusers' names, by diffusers' converter for the family; a tensor the converter needs
    and the file lacks is refused, named."""
    try:
        if part.type == "flux1":
            return flux1_to_diffusers(tensors, part.numbers["hidden"])
        if part.type == "flux2":
            return convert_flux2_transformer_checkpoint_to_diffusers(tensors)
        return convert_z_image_transformer_checkpoint_to_diffusers(tensors)
    except KeyError as error:
        raise ImagineError(f"the diffusion model lacks the tensor {error.args[0]}", 422) from None
    except (RuntimeError, ValueError, IndexError) as error:
        raise ImagineError(f"the diffusion model's tensors do not fit together ({error})", 422) from None


def flux1_to_diffusers(tensors: dict, hidden: int) -> dict:
    """diffusers' FLUX.1 conversion, for any width: its converter splits each single block's fused `linear1` (q, k,
    v and the MLP's input) at width 3072, so it gets shape-only stand-ins of that size, and the real tensors are
    split here at the file's own width."""
    fused = {
        name: tensors.pop(name) for name in list(tensors) if name.startswith("single_blocks.") and ".linear1." in name
    }
    for name, tensor in fused.items():
        tensors[name] = torch.empty((7 * FLUX1_WIDTH, *tensor.shape[1:]), device="meta")
    converted = convert_flux_transformer_checkpoint_to_diffusers(tensors)
    converted.update(tensors)  # what the converter left unused: unknown tensors, which the strict load refuses
    for name, tensor in fused.items():
        _, block, _, kind = name.split(".")  # single_blocks.N.linear1.weight|bias
        stem = f"single_transformer_blocks.{block}."
        q, k, v, mlp = torch.split(tensor, (hidden, hidden, hidden, tensor.shape[0] - 3 * hidden))
        for target, piece in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            converted[f"{stem}{target}.{kind}"] = piece
    return converted
