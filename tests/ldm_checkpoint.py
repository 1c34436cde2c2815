"""Write a diffusers Stable Diffusion 1.x, 2.x or SDXL pipeline as one checkpoint in the original LDM key layout.

Tests need single-file checkpoints shaped like the real ones users download (dreamshaper_8.safetensors and
friends) but cannot fetch any, so they build tiny random pipelines and write them out with this module.

It is the inverse of diffusers.loaders.single_file_utils (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), following diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, except that block and layer counts come from
the model config, so tiny test models with fewer blocks convert as well as full-size SD1.5.
"""

from pathlib import Path
from types import SimpleNamespace

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2's OpenCLIP ViT-H
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG

# OpenCLIP names inside a text transformer layer; q, k and v are one `in_proj` there.
OPEN_CLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)

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
        ("add_embedding.linear_1.", "label_emb.0.0.", ()),  # SDXL's size and text-embedding conditioning
        ("add_embedding.linear_2.", "label_emb.0.2.", ()),
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


def _clip(text_encoder, prefix: str) -> dict:
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; LDM files always have it.
        out[prefix + ("" if key.startswith("text_model.") else "text_model.") + key] = tensor
    return out


def _open_clip(text_encoder, prefix: str) -> dict:
    """OpenCLIP's layout: fused q/k/v, `resblocks`, and a (width, projection) `text_projection` matrix."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            )
        for old, new in OPEN_CLIP_LAYER:
            for kind in ("weight", "bias"):
                out[block + new + kind] = state.pop(layer + old + kind)
    state.pop("embeddings.position_ids", None)
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)}")
    return out


def ldm_state_dict(pipe, dtype: torch.dtype | None = None, family: str = "sd1") -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder weights under LDM checkpoint key names.

    `family` picks the text encoders' layout: "sd1" (CLIP), "sd2" (OpenCLIP), "sdxl" (both)."""
    sd = _rename(pipe.unet.state_dict(), _unet_prefixes(pipe.unet.config), UNET_PREFIX)
    sd |= _rename(pipe.vae.state_dict(), _vae_prefixes(pipe.vae.config), VAE_PREFIX)
    if family == "sd1":
        sd |= _clip(pipe.text_encoder, CLIP_PREFIX)
    elif family == "sd2":
        sd |= _open_clip(pipe.text_encoder, OPEN_CLIP_PREFIX)
    elif family == "sdxl":
        sd |= _clip(pipe.text_encoder, SDXL_CLIP_PREFIX) | _open_clip(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX)
    else:
        raise ValueError(f"family must be sd1, sd2 or sdxl, not {family!r}")
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


def save_ldm_checkpoint(pipe, path, dtype: torch.dtype | None = None, family: str = "sd1") -> None:
    """Write ldm_state_dict(pipe) to `path`: safetensors for *.safetensors, a pickled {"state_dict": ...}
    (the layout of original .ckpt releases) for *.ckpt."""
    path = Path(path)
    sd = ldm_state_dict(pipe, dtype, family)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        raise ValueError(f"expected a .safetensors or .ckpt path, got {path}")


def ldm_shapes(config_dir, family: str) -> dict[str, tuple]:
    """Tensor names and shapes of a checkpoint of `family` whose modules a config folder describes, built on the
    `meta` device: no weights, no memory, a second or two even for SDXL."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_dir = Path(config_dir)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
        }
        if family == "sdxl":
            text_2 = CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")
            modules["text_encoder_2"] = CLIPTextModelWithProjection(text_2)
    return {key: tuple(t.shape) for key, t in ldm_state_dict(type("Pipe", (), modules), family=family).items()}


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def save_random_checkpoint(shapes: dict[str, tuple], path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
    """Write a .safetensors file of small random values with these names and shapes, one tensor at a time.

    safetensors' own save_file holds the whole file in memory twice over; a full-size SDXL checkpoint
    (5 GB in 16 bits) would need 10 GB. This writes the format directly: an 8-byte header length, a
    JSON header of names, dtypes, shapes and byte offsets, then the raw tensor bytes in that order."""
    import json

    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = itemsize * int(torch.Size(shape).numel())
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for shape in shapes.values():
            values = torch.randn(shape, generator=generator).mul_(0.02).to(dtype)
            f.write(values.reshape(-1).view(torch.uint8).numpy().tobytes())
