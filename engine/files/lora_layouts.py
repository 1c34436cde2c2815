"""What a LoRA file's tensor names and shapes say: the family it was trained for (SD 1.x, 2.x, SDXL, Z-Image,
FLUX.2, FLUX.1), and the one rename diffusers' converters need to read a layout people share."""

import re

# The family names each group goes by in a LoRA's kohya metadata (`ss_base_model_version`, `modelspec.architecture`:
# sd-scripts writes "flux1" and "flux-1-dev/lora", musubi-tuner "z-image" and "flux-2-klein-4b"), checked in order.
METADATA_NAMES = (
    ("z-image", ("z-image", "z_image", "zimage")),
    ("flux2", ("flux-2", "flux2", "flux.2")),
    ("flux1", ("flux-1", "flux1", "flux.1")),
)

# What the trainers put before a layer's name: diffusers and ai-toolkit `transformer.` (FLUX.1's diffusers-layout
# kohya files `lora_transformer_`), ComfyUI and BFL `diffusion_model.`, kohya `lora_unet_`, peft `base_model.model.`.
PREFIXES = re.compile(r"^(transformer\.|lora_transformer_|diffusion_model\.|lora_unet_|base_model\.model\.|unet\.)")

# Layers only one family has, in diffusers' names or the original ones, dotted or flattened with `_` as kohya does.
Z_IMAGE_LAYERS = re.compile(r"^(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|adaLN)")
FLUX2_LAYERS = re.compile(
    r"^(double_stream_modulation|single_stream_modulation|transformer_blocks[._]\d+[._]ff(_context)?[._]linear_"
    r"|single_transformer_blocks[._]\d+[._]attn[._](to_qkv_mlp_proj|to_out))"
)
FLUX1_LAYERS = re.compile(
    r"^(double_blocks[._]\d+[._](img|txt)_mod|single_blocks[._]\d+[._]modulation|vector_in"
    r"|transformer_blocks[._]\d+[._](norm1_context|ff(_context)?[._]net)"
    r"|single_transformer_blocks[._]\d+[._](proj_mlp|proj_out|attn[._]to_[qkv]))"
)
FLUX_BLOCKS = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)[._]\d")
SD_LAYERS = re.compile(
    r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|lora_te|text_encoder)"
)
SDXL_LAYERS = re.compile(r"^(input_blocks|output_blocks|lora_te2_|text_encoder_2\.)")

# BFL's layout names the same layers in FLUX.1 and FLUX.2; their shapes differ. How many times wider than the model
# each MLP layer's wide side is (FLUX.1's GELU MLP is 4x, FLUX.2's gated one 3x, fed 6x; a single block's linear1 is
# q, k, v and the MLP's input, its linear2 the attention and the MLP's output), by family.
BFL_RATIOS = {
    re.compile(r"^double_blocks[._]\d+[._](img|txt)_mlp[._]0$"): {4: "flux1", 6: "flux2"},
    re.compile(r"^double_blocks[._]\d+[._](img|txt)_mlp[._]2$"): {4: "flux1", 3: "flux2"},
    re.compile(r"^single_blocks[._]\d+[._]linear1$"): {7: "flux1", 9: "flux2"},
    re.compile(r"^single_blocks[._]\d+[._]linear2$"): {5: "flux1", 4: "flux2"},
}
DOWN = (".lora_down.weight", ".lora_A.weight")
UP = (".lora_up.weight", ".lora_B.weight")


def lora_family(shapes: dict, metadata: dict) -> str | None:
    """The family a LoRA was trained for, from its kohya metadata or its layers ({tensor name: shape}): "sd1",
    "sd2", "sdxl", "sd" (Stable Diffusion 1.x or 2.x: their layers have the same names), "z-image", "flux2",
    "flux1"; None where neither says (a LoRA of FLUX's attention layers alone fits FLUX.1 and FLUX.2 alike)."""
    return metadata_family(metadata) or layout_family(shapes)


def metadata_family(metadata: dict) -> str | None:
    base = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
    for family, names in METADATA_NAMES:
        if any(name in base for name in names):
            return family
    if "xl" in base:
        return "sdxl"
    if re.search(r"(^| )(sd_v2|stable-diffusion-v2)", base) or metadata.get("ss_v2") == "True":
        return "sd2"
    if re.search(r"(^| )(sd_v1|stable-diffusion-v1)", base):
        return "sd1"
    return None


def layout_family(shapes: dict) -> str | None:
    layers = [PREFIXES.sub("", name) for name in shapes]
    for family, pattern in (("z-image", Z_IMAGE_LAYERS), ("flux2", FLUX2_LAYERS), ("flux1", FLUX1_LAYERS)):
        if any(pattern.search(layer) for layer in layers):
            return family
    if any(FLUX_BLOCKS.match(layer) for layer in layers):
        return bfl_family(shapes)
    if any(SDXL_LAYERS.match(layer) for layer in layers):
        return "sdxl"
    if any(SD_LAYERS.match(layer) for layer in layers):
        return "sd"
    return None


def bfl_family(shapes: dict) -> str | None:
    """FLUX.1 or FLUX.2 from the shapes of a BFL-layout LoRA's MLP layers (BFL_RATIOS), where it has any."""
    for name, down in shapes.items():
        if not name.endswith(DOWN) or len(down) != 2:
            continue
        stem = name.removesuffix(DOWN[0]).removesuffix(DOWN[1])
        up = next((shapes[stem + end] for end in UP if stem + end in shapes), None)
        if up is None or len(up) != 2 or not down[1] or not up[0]:
            continue
        layer = PREFIXES.sub("", stem)
        for pattern, families in BFL_RATIOS.items():
            if pattern.match(layer):
                wide, narrow = max(up[0], down[1]), min(up[0], down[1])
                if wide % narrow == 0 and wide // narrow in families:
                    return families[wide // narrow]
    return None


def diffusers_readable(tensors: dict, group: str) -> dict:
    """The LoRA's tensors as the family's diffusers loader reads them, where a layout people share needs a rename for
    its converter to take it (the same matrices, respelled names)."""
    if group == "flux1" and any(name.startswith("diffusion_model.") and ".lora_A." in name for name in tensors):
        # FLUX.1's loader reads BFL-layout files (`diffusion_model.` names) only with kohya's lora_down/lora_up, and
        # takes ai-toolkit's and BFL's lora_A/lora_B there for diffusers names it then cannot find. With no `alpha`,
        # kohya's converter scales by 1, as those files mean.
        return respelled(tensors, {".lora_A.": ".lora_down.", ".lora_B.": ".lora_up."})
    if group == "z-image" and any(FUSED_QKV.search(name) for name in tensors):
        # Z-Image's converter splits an attention's fused qkv layer (Z-Image's original names, as ComfyUI's files
        # have them) only in the `.lora.down`/`.lora.up` spelling; in the others it keeps `qkv`, which diffusers'
        # model does not have, and diffusers drops those layers with only a warning.
        return respelled(tensors, Z_IMAGE_DOTTED)
    return tensors


FUSED_QKV = re.compile(r"\.attention\.qkv\.lora_(A|down)\.weight$")
Z_IMAGE_DOTTED = {
    ".lora_A.weight": ".lora.down.weight",
    ".lora_down.weight": ".lora.down.weight",
    ".lora_B.weight": ".lora.up.weight",
    ".lora_up.weight": ".lora.up.weight",
}


def respelled(tensors: dict, spellings: dict) -> dict:
    """The tensors with each part of their names that `spellings` holds spelled as it says."""
    out = {}
    for name, tensor in tensors.items():
        for old, new in spellings.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out
