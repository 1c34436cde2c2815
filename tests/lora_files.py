"""LoRA and embedding files in the layouts people download, made for any pipeline's layer shapes."""

import re

import torch
from diffusion_model_files import original_layout, tiny_model_state

UNET_LAYERS = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$|ff\.net\.(0\.proj|2)$")
TEXT_LAYERS = re.compile(r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")


def sgm_name(name: str) -> str:
    """kohya's SDXL LoRAs name UNet blocks as the original (SGM) code does: input_blocks.4.1, not
    down_blocks.1.attentions.0 (here for a UNet of two levels with two layers each, as the tiny SDXL has)."""
    name = re.sub(
        r"^down_blocks\.(\d)\.attentions\.(\d)", lambda m: f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.1", name
    )
    name = re.sub(r"^up_blocks\.(\d)\.attentions\.(\d)", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1", name)
    return name.replace("mid_block.attentions.0", "middle_block.1")


def kohya_lora(pipe, seed=0, rank=4, text=True, sdxl=False, scale=0.5) -> dict:
    """A LoRA in kohya's layout (lora_unet_*, lora_te_* or lora_te1_/lora_te2_*, with .alpha) on attention
    and MLP layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def add(prefix, layer):
        state[f"{prefix}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * scale
        state[f"{prefix}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * scale
        state[f"{prefix}.alpha"] = torch.tensor(float(rank))

    for name, layer in pipe.unet.named_modules():
        if UNET_LAYERS.search(name):
            add("lora_unet_" + (sgm_name(name) if sdxl else name).replace(".", "_"), layer)
    encoders = (
        [("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)]
        if sdxl
        else [("lora_te", pipe.text_encoder)]
    )
    for prefix, encoder in encoders if text else []:
        for name, layer in encoder.named_modules():
            if TEXT_LAYERS.search(name):
                add(f"{prefix}_text_model_" + name.removeprefix("text_model.").replace(".", "_"), layer)
    return state


def diffusers_lora(pipe, seed=3, rank=4, scale=0.5) -> dict:
    """A LoRA as diffusers saves one: unet.<module>.lora_A/lora_B."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in pipe.unet.named_modules():
        if UNET_LAYERS.search(name):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * scale
            state[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * scale
    return state


def token_vectors(encoder, tokenizer, text) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[ids].detach().clone()


# The layers a flow LoRA trains: each transformer block's linear layers (attention, MLP, and FLUX.1's modulation),
# named as diffusers names them or, for FLUX, as BFL's original layout does (kohya's and ComfyUI's files).
FLOW_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|layers|double_blocks|single_blocks)\.\d+\.")


def flow_layers(config: dict, original: bool) -> dict:
    """{layer name: (out, in)} of each linear layer a flow LoRA trains in the tiny model `config` describes: diffusers'
    names, or (`original`) FLUX's BFL names; Z-Image's trainers use diffusers' names either way."""
    state = tiny_model_state(config, torch.float32)
    if original and config["_class_name"] != "ZImageTransformer2DModel":
        state = original_layout(state, config)
    if original and config["_class_name"] == "FluxTransformer2DModel":
        # diffusers' FLUX.1 converter splits a single block's linear1 at FLUX.1's real widths (3072), not the tiny ones
        state = {name: tensor for name, tensor in state.items() if ".linear1." not in name}
    return {
        name.removesuffix(".weight"): tuple(tensor.shape)
        for name, tensor in state.items()
        if FLOW_BLOCK.match(name) and name.endswith(".weight") and tensor.dim() == 2 and "norm" not in name
    }


def flow_lora(config: dict, layout: str, seed: int = 0, rank: int = 4, scale: float = 0.3) -> dict:
    """A LoRA for the tiny flow model `config` describes, in one of the layouts people share: "diffusers" (diffusers'
    and ai-toolkit's FLUX.1 files: transformer.<module>.lora_A/B), "kohya" (lora_unet_<module with _>.lora_down/up
    and alpha, over BFL's modules for FLUX) or "comfyui" (diffusion_model.<module>.lora_A/B: ai-toolkit's FLUX.2 and
    Z-Image files, BFL's own)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (rows, columns) in flow_layers(config, original=layout != "diffusers").items():
        down = torch.randn(rank, columns, generator=generator) * scale
        up = torch.randn(rows, rank, generator=generator) * scale
        if layout == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
            state[f"{stem}.alpha"] = torch.tensor(2.0)  # half the rank: the layer counts at half its weight
        else:
            stem = ("transformer." if layout == "diffusers" else "diffusion_model.") + name
            state |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
    return state


def z_image_fused(state: dict) -> tuple:
    """(the Z-Image LoRA `state` of ComfyUI's layout with each attention's q, k and v in one `qkv` layer and `out`
    for `to_out.0`, as Z-Image's original names have them; the same LoRA in diffusers' split layers). A fused layer
    has one down matrix for q, k and v: the split LoRA takes q's for all three, so the two are the same LoRA."""
    fused, split = {}, dict(state)
    for name, tensor in state.items():
        if ".attention.to_q.lora_A." in name:
            for x in "kv":
                split[name.replace("to_q", f"to_{x}")] = tensor.clone()
            fused[name.replace("to_q", "qkv")] = tensor
        elif ".attention.to_q.lora_B." in name:
            fused[name.replace("to_q", "qkv")] = torch.cat([state[name.replace("to_q", f"to_{x}")] for x in "qkv"])
        elif ".attention.to_k." not in name and ".attention.to_v." not in name:
            fused[name.replace(".attention.to_out.0.", ".attention.out.")] = tensor
    return fused, split
