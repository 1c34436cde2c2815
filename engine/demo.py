"""The built-in demo model: a tiny Stable Diffusion with random weights, built in about a second (its tiny VAE builds
the tests' other tiny models too)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def build_tiny_vae(**config) -> AutoencoderKL:
    """A VAE of a few MB with four blocks, as in the real model: latents are 1/8 of the image, so
    previews and img2img see the same geometry as with a real checkpoint."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        **config,
    )


def build_demo_pipeline(config_dir: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion with random weights, built in about a second: its pictures are noise.

    It runs the real pipeline end to end (tokenizer, text encoder, UNet, VAE, samplers), so a fresh
    machine can prove the whole path without a multi-gigabyte download. The same seed builds the same
    weights, so the demo model gives the same picture for the same request across restarts.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = build_tiny_vae()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                vocab_size=49408,
                max_position_embeddings=77,
            )
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(config_dir / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(config_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
