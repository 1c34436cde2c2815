"""Tiny random SDXL and SD2 pipelines of their families' real structure (a few MB, built in seconds), and the config
folders that fit them, for the tests of single-file checkpoints, inpainting checkpoints, prompts and LoRAs."""

import torch
from diffusers import (
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.demo import build_tiny_vae
from engine.settings import CONFIGS_DIR


def tiny_text_encoder(cls=CLIPTextModel, **config):
    text = dict(intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, vocab_size=49408)
    return cls(CLIPTextConfig(**text, max_position_embeddings=77, **config))


def tiny_unet(**config):
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        **config,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL's structure in miniature: two text encoders (of different widths, or the single-file loader
    cannot tell them apart), size and time conditioning, deeper transformers in the lower block."""
    torch.manual_seed(0)
    configs = CONFIGS_DIR / "sdxl"
    return StableDiffusionXLPipeline(
        vae=build_tiny_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=tiny_text_encoder(hidden_size=32),
        text_encoder_2=tiny_text_encoder(
            CLIPTextModelWithProjection, hidden_size=48, projection_dim=48, hidden_act="gelu"
        ),
        tokenizer=CLIPTokenizer.from_pretrained(configs / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(configs / "tokenizer_2"),
        # cross attention sees both encoders side by side (32 + 48); the added conditioning is the
        # pooled 48-wide text embedding plus six 8-wide size and crop embeddings.
        unet=tiny_unet(
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=80,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=96,
        ),
        scheduler=EulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
    )


def tiny_sd2(prediction: str) -> StableDiffusionPipeline:
    """SD2's structure in miniature: an OpenCLIP-style text encoder (gelu) and linear projections."""
    torch.manual_seed(1)
    return StableDiffusionPipeline(
        vae=build_tiny_vae(),
        text_encoder=tiny_text_encoder(hidden_size=32, hidden_act="gelu"),
        tokenizer=CLIPTokenizer.from_pretrained(CONFIGS_DIR / "sd2" / "tokenizer"),
        unet=tiny_unet(cross_attention_dim=32),
        scheduler=PNDMScheduler.from_pretrained(CONFIGS_DIR / "sd2" / "scheduler", prediction_type=prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_configs(pipe, path):
    """A config folder like those in configs/: every module's config and the tokenizers, no weights."""
    pipe.save_config(path)
    for name, module in pipe.components.items():
        if module is None:
            continue
        if name.startswith("tokenizer"):
            module.save_pretrained(path / name)
        elif hasattr(module, "save_config"):  # diffusers models and schedulers
            module.save_config(path / name)
        else:  # transformers models
            module.config.save_pretrained(path / name)
