"""TAESD decoder files (madebyollin's tiny autoencoders) with random weights, made by diffusers' own AutoencoderTiny:
in the original layout that ComfyUI's and A1111's `vae_approx/` files have, or as a diffusers folder."""

from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from flow_models import save


def tiny_autoencoder(channels: int, seed: int = 0) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny (TAESD's architecture) with random weights, reading `channels`-channel latents."""
    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=channels).eval()


def original_layout(vae: AutoencoderTiny) -> dict:
    """Its decoder's tensors as madebyollin's taesd_decoder files name them: diffusers' `layers.N` is the original
    Sequential's N+1, whose first member, the clamp, holds no tensor."""
    tensors = {}
    for name, tensor in vae.decoder.state_dict().items():
        _, index, rest = name.split(".", 2)
        tensors[f"{int(index) + 1}.{rest}"] = tensor.clone()
    return tensors


def write_decoder(models: Path, vae: AutoencoderTiny, name: str, form: str = "safetensors") -> Path:
    """`vae`'s decoder in `models`/vae_approx as `name`'s file in `form`: the original layout as .safetensors or
    .pth, or the whole autoencoder as a diffusers folder."""
    folder = models / "vae_approx"
    if form == "diffusers folder":
        vae.save_pretrained(folder / name)
        return folder / name
    if form == "pth":
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(original_layout(vae), folder / f"{name}_decoder.pth")
        return folder / f"{name}_decoder.pth"
    return save(folder / f"{name}_decoder.safetensors", original_layout(vae))
