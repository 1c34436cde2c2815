"""Tiny random diffusion models of FLUX.1, FLUX.2 (klein) and Z-Image, of each family's real architecture at a width
of 32, as the files people download hold them: {original key: tensor} in BFL's layout (FLUX) or the layout of
ComfyUI's Z-Image files, and their transformer configs. Each is built as the diffusers model and then renamed to the
original layout by the inverse of diffusers' converter, so that converting it back gives the model's own state dict
(tests/test_diffusion_models.py proves the round trip). The widths fit the tiny text encoders (32 wide) and VAEs
(16 and 32 latent channels) of the other tests."""

import json
from pathlib import Path

import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, ZImageTransformer2DModel
from safetensors.torch import save_file

from engine.files.headers import Tensor

MODEL_CLASSES = (FluxTransformer2DModel, Flux2Transformer2DModel, ZImageTransformer2DModel)
SEED = 0
STD = 0.02  # small weights: outputs stay finite through every block

TINY_CONFIGS = {
    "flux1-dev": {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
    },
    "flux2-klein": {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": 128,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 96,  # 3 x the tiny Qwen3's width: klein stacks three of its layers
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [4, 4, 4, 4],
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,  # klein is step-distilled, with no guidance embedder
    },
    "z-image": {
        "_class_name": "ZImageTransformer2DModel",
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "dim": 32,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": 32,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [4, 6, 6],
        "axes_lens": [1536, 512, 512],
    },
}
TINY_CONFIGS["flux1-schnell"] = {**TINY_CONFIGS["flux1-dev"], "guidance_embeds": False}
# klein's second size, as 9B differs from 4B: more heads, and the three layers of a wider Qwen3 (48: 3 x 48)
TINY_CONFIGS["flux2-klein/transformer-9b"] = {
    **TINY_CONFIGS["flux2-klein"],
    "num_attention_heads": 3,
    "joint_attention_dim": 144,
    "num_layers": 2,
}


def write_tiny_transformer_configs(configs_dir: Path) -> None:
    """The tiny models' configs: configs_dir/<family>/transformer/config.json for each family, and the other sizes'
    configs where a family has them (configs_dir/flux2-klein/transformer-9b/config.json)."""
    for name, config in TINY_CONFIGS.items():
        folder = configs_dir / name if "/" in name else configs_dir / name / "transformer"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def random_state(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """The model's state dict filled with seeded random numbers (std STD), in `dtype`."""
    generator = torch.Generator().manual_seed(SEED)
    return {
        name: (torch.randn(tensor.shape, generator=generator) * STD).to(dtype)
        for name, tensor in sorted(model.state_dict().items())
    }


def meta_model(config: dict) -> torch.nn.Module:
    """The diffusers model `config` describes, on the meta device: names and shapes, no memory."""
    model_class = {cls.__name__: cls for cls in MODEL_CLASSES}[config["_class_name"]]
    with torch.device("meta"):
        return model_class.from_config(config)


def tiny_model_state(config: dict, dtype: torch.dtype) -> dict:
    """A random diffusers state dict of the model `config` describes."""
    return random_state(meta_model(config), dtype)


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # diffusers' final norm projects to (scale, shift); BFL's to (shift, scale): the converter swaps them
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def renamed(state: dict, stem: str, original_stem: str, pairs: tuple) -> dict:
    """{original name: tensor} for the (diffusers module, original module) pairs under the two stems; a diffusers
    norm's `weight` is BFL's `scale`."""
    moved = {}
    for module, original in pairs:
        for suffix in ("weight", "bias"):
            name = f"{stem}{module}.{suffix}"
            if name in state:
                original_suffix = "scale" if original.endswith("_norm") else suffix
                moved[f"{original_stem}{original}.{original_suffix}"] = state[name]
    return moved


def fused(state: dict, stem: str, original: str, modules: tuple) -> dict:
    """{original name: the modules' tensors concatenated}, for weight and bias where they have one."""
    out = {}
    for suffix in ("weight", "bias"):
        names = [f"{stem}{module}.{suffix}" for module in modules]
        if names[0] in state:
            out[f"{original}.{suffix}"] = torch.cat([state[name] for name in names], dim=0)
    return out


FLUX1_TOP = (
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
)
FLUX1_DOUBLE = (
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.norm_q", "img_attn.norm.query_norm"),
    ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
    ("attn.norm_added_k", "txt_attn.norm.key_norm"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
)
FLUX1_SINGLE = (
    ("norm.linear", "modulation.lin"),
    ("attn.norm_q", "norm.query_norm"),
    ("attn.norm_k", "norm.key_norm"),
    ("proj_out", "linear2"),
)
FLUX2_TOP = (
    ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
    ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
    ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
)
FLUX2_DOUBLE = (
    ("attn.norm_q", "img_attn.norm.query_norm"),
    ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
    ("attn.norm_added_k", "txt_attn.norm.key_norm"),
    ("ff.linear_in", "img_mlp.0"),
    ("ff.linear_out", "img_mlp.2"),
    ("ff_context.linear_in", "txt_mlp.0"),
    ("ff_context.linear_out", "txt_mlp.2"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
)
FLUX2_SINGLE = (
    ("attn.to_qkv_mlp_proj", "linear1"),
    ("attn.to_out", "linear2"),
    ("attn.norm_q", "norm.query_norm"),
    ("attn.norm_k", "norm.key_norm"),
)
IMAGE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
TEXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def flux_original(state: dict, config: dict, top: tuple, double: tuple, single: tuple, single_fused: tuple) -> dict:
    """BFL's layout of a FLUX.1 or FLUX.2 diffusers state dict."""
    out = renamed(state, "", "", top)
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(state["norm_out.linear.weight"])
    if "norm_out.linear.bias" in state:
        out["final_layer.adaLN_modulation.1.bias"] = swap_halves(state["norm_out.linear.bias"])
    for block in range(config["num_layers"]):
        stem, original = f"transformer_blocks.{block}.", f"double_blocks.{block}."
        out |= renamed(state, stem, original, double)
        out |= fused(state, stem, f"{original}img_attn.qkv", IMAGE_QKV)
        out |= fused(state, stem, f"{original}txt_attn.qkv", TEXT_QKV)
    for block in range(config["num_single_layers"]):
        stem, original = f"single_transformer_blocks.{block}.", f"single_blocks.{block}."
        out |= renamed(state, stem, original, single)
        if single_fused:
            out |= fused(state, stem, f"{original}linear1", single_fused)
    return out


def flux1_original(state: dict, config: dict) -> dict:
    """BFL's FLUX.1 layout: q, k, v fused in double blocks; q, k, v and the MLP's input fused in single blocks."""
    return flux_original(state, config, FLUX1_TOP, FLUX1_DOUBLE, FLUX1_SINGLE, (*IMAGE_QKV, "proj_mlp"))


def flux2_original(state: dict, config: dict) -> dict:
    """BFL's FLUX.2 layout: q, k, v fused in double blocks (single blocks are fused in diffusers too)."""
    return flux_original(state, config, FLUX2_TOP, FLUX2_DOUBLE, FLUX2_SINGLE, ())


def z_image_original_name(name: str) -> str:
    """The inverse of diffusers' Z-Image renames."""
    for diffusers_name, original in (
        ("all_final_layer.2-1.", "final_layer."),
        ("all_x_embedder.2-1.", "x_embedder."),
        (".attention.to_out.0.", ".attention.out."),
        (".attention.norm_q.", ".attention.q_norm."),
        (".attention.norm_k.", ".attention.k_norm."),
    ):
        name = name.replace(diffusers_name, original)
    return name


def z_image_original(state: dict, config: dict) -> dict:
    """The layout of ComfyUI's z_image_turbo_bf16.safetensors: fused qkv, `out`, `q_norm`."""
    out = {}
    for name, tensor in state.items():
        if ".attention.to_q." in name:
            stem = name[: name.index(".attention.to_q.")]
            out[f"{stem}.attention.qkv.weight"] = torch.cat([state[f"{stem}.attention.to_{x}.weight"] for x in "qkv"])
        elif ".attention.to_k." not in name and ".attention.to_v." not in name:
            out[z_image_original_name(name)] = tensor
    return out


ORIGINAL_LAYOUTS = {
    "FluxTransformer2DModel": flux1_original,
    "Flux2Transformer2DModel": flux2_original,
    "ZImageTransformer2DModel": z_image_original,
}


def original_layout(state: dict, config: dict) -> dict:
    """A diffusers state dict of the model `config` describes, renamed to its family's original layout."""
    return ORIGINAL_LAYOUTS[config["_class_name"]](state, config)


def flux1_tensors(guidance: bool = True, double_blocks: int = 2, single_blocks: int = 2, dtype=torch.bfloat16) -> dict:
    """A tiny FLUX.1 (dev with `guidance`, schnell without) in BFL's layout, with the block counts asked for."""
    config = {
        **TINY_CONFIGS["flux1-dev"],
        "guidance_embeds": guidance,
        "num_layers": double_blocks,
        "num_single_layers": single_blocks,
    }
    return flux1_original(tiny_model_state(config, dtype), config)


def flux2_tensors(dtype=torch.bfloat16, size="flux2-klein") -> dict:
    """A tiny FLUX.2 klein in BFL's layout; `size` "flux2-klein/transformer-9b" for one shaped as 9B is."""
    return flux2_original(tiny_model_state(TINY_CONFIGS[size], dtype), TINY_CONFIGS[size])


def z_image_tensors(dtype=torch.bfloat16) -> dict:
    """A tiny Z-Image in the layout of ComfyUI's Z-Image files."""
    return z_image_original(tiny_model_state(TINY_CONFIGS["z-image"], dtype), TINY_CONFIGS["z-image"])


def full_size_header(config_dir: Path, transformer: str = "transformer") -> dict:
    """{original name: Tensor(shape, "BF16")}: the header of a bf16 file of the transformer `config_dir/transformer`
    describes (a shipped folder: the real size), built on the meta device, with no weights."""
    config = json.loads((config_dir / transformer / "config.json").read_text())
    tensors = original_layout(meta_model(config).state_dict(), config)
    return {name: Tensor(tuple(tensor.shape), "BF16") for name, tensor in tensors.items()}


def random_fp8_file(path: Path, shapes: dict) -> None:
    """A .safetensors of random weights of the given {name: shape}, stored as people download them to save memory:
    matrices in fp8 (e4m3fn), norm scales of 1 and biases of 0 in bf16."""
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            tensors[name] = (torch.randn(shape) * STD).to(torch.float8_e4m3fn)
        else:
            tensors[name] = (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=torch.bfloat16)
    save_file(tensors, str(path))


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """What fp8 files store in fp8: the weight matrices; not the norms, biases and pad tokens."""
    return tensor.dim() == 2 and min(tensor.shape) > 1


def scaled_fp8_tensors(tensors: dict, chosen=is_matrix, layout: str = "mixed") -> dict:
    """The tensors as ComfyUI's scaled fp8 files hold them: each weight `chosen(name, tensor)` picks as the fp8
    values of weight / scale beside its scale, in ComfyUI's newer "mixed" layout (a 0-dimensional `weight_scale`, an
    `input_scale` and a `comfy_quant` note naming the format) or the "older" one (`scale_weight`, `scale_input` and
    a `scaled_fp8` marker)."""
    note = list(b'{"format": "float8_e4m3fn"}')
    scaled = {} if layout == "mixed" else {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in tensors.items():
        if not chosen(name, tensor):
            scaled[name] = tensor
            continue
        scale = tensor.float().abs().max() / 448  # fp8 e4m3's largest value, as ComfyUI scales
        stem = name.removesuffix(".weight")
        scaled[name] = (tensor.float() / scale).to(torch.float8_e4m3fn)
        if layout == "mixed":
            scaled[stem + ".weight_scale"] = scale
            scaled[stem + ".input_scale"] = torch.tensor(1.0)
            scaled[stem + ".comfy_quant"] = torch.tensor(note, dtype=torch.uint8)
        else:
            scaled[stem + ".scale_weight"] = scale.reshape(1)
            scaled[stem + ".scale_input"] = torch.ones(1)
    return scaled


def nvfp4_tensors(tensors: dict, chosen=is_matrix) -> dict:
    """The tensors as ComfyUI's nvfp4 files hold them (zeros for values): each weight `chosen` picks as 4-bit values
    packed two to a byte, a scale per block of 16 values (fp8), a scale for the whole weight and a `comfy_quant` note
    naming the format."""
    note = list(b'{"format": "nvfp4"}')
    packed = {}
    for name, tensor in tensors.items():
        if not chosen(name, tensor):
            packed[name] = tensor
            continue
        stem = name.removesuffix(".weight")
        rows, columns = tensor.shape
        packed[name] = torch.zeros(rows, columns // 2, dtype=torch.uint8)
        packed[stem + ".weight_scale"] = torch.ones(rows, columns // 16).to(torch.float8_e4m3fn)
        packed[stem + ".weight_scale_2"] = torch.tensor(1.0)
        packed[stem + ".input_scale"] = torch.tensor(1.0)
        packed[stem + ".comfy_quant"] = torch.tensor(note, dtype=torch.uint8)
    return packed
