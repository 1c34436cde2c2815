"""Write a diffusers Stable Diffusion 1.x pipeline as one checkpoint in the original LDM/CompVis key layout.

Tests need single-file checkpoints shaped like the real ones users download (dreamshaper_8.safetensors and
friends) but cannot fetch any, so they build tiny random pipelines and write them out with this module.

It is the inverse of diffusers.loaders.single_file_utils (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), following diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, except that block and layer counts come from
the model config, so tiny test models with fewer blocks convert as well as full-size SD1.5.
"""

from pathlib import Path
from types import SimpleNamespace

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Parameter names inside a ResnetBlock2D: LDM's UNet ResBlock keeps them in Sequentials.
UNET_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
# The VAE's ResnetBlock names match LDM's except the 1x1 shortcut.
VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
# LDM's VAE AttnBlock names its projections q/k/v/proj_out (diffusers' Attention uses to_q/.../to_out.0).
VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _unet_prefixes(config) -> list[tuple[str, str, tuple]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every UNet sub-module."""
    layers = config.layers_per_block
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0.", ()),
        ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()),
        ("conv_norm_out.", "out.0.", ()),
        ("conv_out.", "out.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
    ]
    for b in range(len(config.block_out_channels)):
        # LDM flattens blocks into numbered input_blocks/output_blocks holding [resnet, attention?,
        # resampler?]. input_blocks.0 is conv_in; each down block then takes `layers` entries for its
        # resnets plus one for its downsampler, each up block `layers + 1` entries, the last of which also
        # holds the upsampler. Attention-free blocks simply have no `attentions.*` keys to match.
        first_in, first_out = 1 + b * (layers + 1), b * (layers + 1)
        for j in range(layers):
            pairs.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{first_in + j}.0.", UNET_RESNET))
            pairs.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{first_in + j}.1.", ()))
        pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{first_in + layers}.0.op.", ()))
        for j in range(layers + 1):
            pairs.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{first_out + j}.0.", UNET_RESNET))
            pairs.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{first_out + j}.1.", ()))
        slot = 2 if "CrossAttn" in config.up_block_types[b] else 1  # after the attention, if any
        pairs.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{first_out + layers}.{slot}.", ()))
    return pairs


def _vae_prefixes(config) -> list[tuple[str, str, tuple]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every AutoencoderKL sub-module."""
    pairs = [(name, name, ()) for name in ("quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        pairs += [
            (f"{side}.conv_in.", f"{side}.conv_in.", ()),
            (f"{side}.conv_out.", f"{side}.conv_out.", ()),
            (f"{side}.conv_norm_out.", f"{side}.norm_out.", ()),
            (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", VAE_RESNET),
            (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", VAE_RESNET),
            (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", VAE_ATTENTION),
        ]
    count, layers = len(config.block_out_channels), config.layers_per_block
    for b in range(count):
        # LDM numbers decoder blocks by resolution (up.0 runs last), diffusers in the order they run.
        up = count - 1 - b
        for j in range(layers):
            pairs.append((f"encoder.down_blocks.{b}.resnets.{j}.", f"encoder.down.{b}.block.{j}.", VAE_RESNET))
        for j in range(layers + 1):  # the decoder has one resnet more per block
            pairs.append((f"decoder.up_blocks.{b}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET))
        pairs.append((f"encoder.down_blocks.{b}.downsamplers.0.", f"encoder.down.{b}.downsample.", ()))
        pairs.append((f"decoder.up_blocks.{b}.upsamplers.0.", f"decoder.up.{up}.upsample.", ()))
    return pairs


def _rename(state_dict: dict, pairs: list[tuple[str, str, tuple]], prefix: str) -> dict:
    out = {}
    for key, tensor in state_dict.items():
        # A trailing "." on every prefix keeps e.g. `resnets.1.` from matching `resnets.10.`.
        match = next((p for p in pairs if key.startswith(p[0])), None)
        if match is None:  # fail loudly rather than write a key no loader will look for
            raise KeyError(f"no LDM name for {key!r}")
        old, new, renames = match
        rest = key[len(old) :]
        for inner_old, inner_new in renames:
            if rest.startswith(inner_old):
                rest = inner_new + rest[len(inner_old) :]
        if renames is VAE_ATTENTION and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs, diffusers linear layers
        out[prefix + new + rest] = tensor
    return out


def ldm_state_dict(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder weights under LDM checkpoint key names."""
    sd = _rename(pipe.unet.state_dict(), _unet_prefixes(pipe.unet.config), UNET_PREFIX)
    sd |= _rename(pipe.vae.state_dict(), _vae_prefixes(pipe.vae.config), VAE_PREFIX)
    for key, tensor in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; LDM files always have it.
        sd[CLIP_PREFIX + ("" if key.startswith("text_model.") else "text_model.") + key] = tensor
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # Own contiguous copies: safetensors refuses non-contiguous tensors, and the checkpoint must not
    # change if the caller goes on to modify the pipeline's weights.
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sd.items()}


def random_sd15_modules(config_dir) -> SimpleNamespace:
    """UNet, VAE and CLIP text encoder with the exact SD1.5 architecture (configs from `config_dir`) and random
    weights: about 1.07 billion parameters, 4.3 GB in float32. Speed does not depend on the weight values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = Path(config_dir)
    return SimpleNamespace(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
    )


def save_ldm_checkpoint(pipe, path, dtype: torch.dtype | None = None) -> None:
    """Write ldm_state_dict(pipe) to `path`: safetensors for *.safetensors, a pickled {"state_dict": ...}
    (the layout of original .ckpt releases) for *.ckpt."""
    path = Path(path)
    sd = ldm_state_dict(pipe, dtype)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        raise ValueError(f"expected a .safetensors or .ckpt path, got {path}")
