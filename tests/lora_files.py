"""LoRA and embedding files in the layouts people download, made for any pipeline's layer shapes."""

import re

import torch

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
