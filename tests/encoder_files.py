"""Tiny random text encoders and VAEs of the newer families, in the key layouts of the files people download
(ComfyUI's `qwen_3_4b`, `t5xxl`, `clip_l`; BFL's `ae` and FLUX.2 VAE), and tiny configs to load them with.

The numbers are fixed: the tiny diffusion transformers of tests/diffusion_model_files.py are built to match them
(Qwen3 width 32 and depth 4, T5 width 32, CLIP width 32, VAE latents 16 and 32). The vocabularies are the real ones,
so that the shipped tokenizers' ids fit. Each `*_tensors` function returns {original name: tensor} without a prefix;
the caller saves it, adding a prefix such as `text_encoders.qwen3_4b.transformer.` for an all-in-one checkpoint.
"""

import json
import os
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from ldm_checkpoint import _rename, _vae_prefixes

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SEED = 0

QWEN3 = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
QWEN3 |= {"intermediate_size": 64, "vocab_size": 151936, "max_window_layers": 4}
QWEN3_WIDER = {**QWEN3, "hidden_size": 48, "num_attention_heads": 3}  # as Qwen3-8B is wider than 4B, for klein 9B
T5 = {"d_model": 32, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 64}
T5 |= {"vocab_size": 32128}
CLIP_L = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
CLIP_L |= {"vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 32}
VAE = {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}

# (family, sub-folder) -> (the shipped config it shrinks, tiny numbers)
TINY_CONFIGS = {
    ("z-image", "text_encoder"): ("z-image/text_encoder", QWEN3),
    ("z-image", "vae"): ("flux1-dev/vae", VAE),
    ("flux2-klein", "text_encoder"): ("z-image/text_encoder", QWEN3),
    ("flux2-klein", "vae"): ("flux2-klein/vae", VAE),
    **{
        (family, folder): (source, numbers)
        for family in ("flux1-dev", "flux1-schnell")
        for folder, source, numbers in (
            ("text_encoder", "sd1/text_encoder", CLIP_L),
            ("text_encoder_2", "flux1-dev/text_encoder_2", T5),
            ("vae", "flux1-dev/vae", VAE),
        )
    },
}


def write_tiny_encoder_configs(configs_dir: Path) -> None:
    """A tiny config.json in configs_dir/<family>/{text_encoder,text_encoder_2,vae} for the four families."""
    for (family, folder), (source, numbers) in TINY_CONFIGS.items():
        path = Path(configs_dir) / family / folder / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():  # a copied folder may link to a shared file: replace the link, not the file it names
            os.unlink(path)
        path.write_text(json.dumps(_tiny_config(source, numbers), indent=2) + "\n")


def qwen3_tensors(dtype=torch.bfloat16, numbers=QWEN3) -> dict:
    """ComfyUI's qwen_3_4b.safetensors layout: `model.embed_tokens.weight`, `model.layers.N...`, `model.norm.weight`;
    `numbers` QWEN3_WIDER for a wider one, as qwen_3_8b.safetensors is."""
    model = _seeded(lambda: transformers.Qwen3Model(_transformers_config("z-image/text_encoder", numbers)))
    return {"model." + name: tensor.to(dtype) for name, tensor in model.state_dict().items()}


def t5_tensors(dtype=torch.bfloat16) -> dict:
    """ComfyUI's t5xxl layout: the embedding once, as `shared.weight`, and `encoder.block.N...`."""
    model = _seeded(lambda: transformers.T5EncoderModel(_transformers_config("flux1-dev/text_encoder_2", T5)))
    state = model.state_dict()
    return {name: tensor.to(dtype) for name, tensor in state.items() if name != "encoder.embed_tokens.weight"}


def clip_l_tensors(dtype=torch.bfloat16) -> dict:
    """ComfyUI's clip_l layout: `text_model.` names, and the projection the text encoder itself does not use."""
    model = _seeded(lambda: transformers.CLIPTextModel(_transformers_config("sd1/text_encoder", CLIP_L)))
    tensors = {"text_model." + name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    tensors.pop("text_model.embeddings.position_ids", None)
    width = CLIP_L["hidden_size"]
    tensors["text_projection.weight"] = _seeded(lambda: torch.randn(width, width) * 0.02).to(dtype)
    return tensors


def ae_tensors(dtype=torch.bfloat16, numbers=VAE) -> dict:
    """BFL's FLUX.1 `ae.safetensors` layout (LDM's VAE names, no quant convs), 16 latent channels; `numbers` {}: the
    released size."""
    vae = _seeded(lambda: AutoencoderKL.from_config(_tiny_config("flux1-dev/vae", numbers)))
    return {name: tensor.to(dtype) for name, tensor in _rename(vae.state_dict(), _vae_prefixes(vae.config), "").items()}


def flux2_vae_tensors(dtype=torch.bfloat16, numbers=VAE) -> dict:
    """BFL's FLUX.2 VAE layout: LDM's names with the quant convs inside encoder and decoder, and the batch norm
    `bn` over 2x2-patchified latents (running statistics only), 32 latent channels; `numbers` {}: the released size."""
    vae = _seeded(lambda: AutoencoderKLFlux2.from_config(_tiny_config("flux2-klein/vae", numbers)))
    state = vae.state_dict()
    channels = state["bn.running_mean"].shape[0]
    generator = torch.Generator().manual_seed(SEED)
    tensors = {
        "bn.running_mean": torch.randn(channels, generator=generator) * 0.1,
        "bn.running_var": 1 + torch.rand(channels, generator=generator),
        "encoder.quant_conv.weight": state.pop("quant_conv.weight"),
        "encoder.quant_conv.bias": state.pop("quant_conv.bias"),
        "decoder.post_quant_conv.weight": state.pop("post_quant_conv.weight"),
        "decoder.post_quant_conv.bias": state.pop("post_quant_conv.bias"),
    }
    encoder_decoder = {name: tensor for name, tensor in state.items() if not name.startswith("bn.")}
    tensors |= _rename(encoder_decoder, _vae_prefixes(vae.config), "")
    return {name: tensor.to(dtype) for name, tensor in tensors.items()}


def _tiny_config(source: str, numbers: dict) -> dict:
    values = json.loads((SHIPPED_CONFIGS / source / "config.json").read_text())
    if "block_out_channels" in numbers:
        count = len(numbers["block_out_channels"])
        values["down_block_types"] = values["down_block_types"][:1] * count
        values["up_block_types"] = values["up_block_types"][:1] * count
    return values | numbers


def _transformers_config(source: str, numbers: dict) -> transformers.PretrainedConfig:
    values = _tiny_config(source, numbers)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def _seeded(build):
    torch.manual_seed(SEED)
    return build()
