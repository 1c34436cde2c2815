"""The diffusion models of FLUX.1, FLUX.2 klein and Z-Image, as people download them: recognised from a file's header
(a file of its own or a ComfyUI all-in-one checkpoint), loaded strictly through a config folder with no network,
fp8 files kept fp8; files that do not fit are refused, naming what did not fit; the shipped configs have the
published sizes."""

import json
import shutil

import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, ZImageTransformer2DModel
from diffusion_model_files import (
    TINY_CONFIGS,
    flux1_tensors,
    flux2_tensors,
    full_size_header,
    meta_model,
    nvfp4_tensors,
    scaled_fp8_tensors,
    tiny_model_state,
    write_tiny_transformer_configs,
    z_image_tensors,
)
from safetensors.torch import save_file

from engine.errors import ImagineError
from engine.files.catalog import Catalog
from engine.files.diffusion_models import (
    REFUSALS,
    fitted_config,
    load_diffusion_model,
    recognise_diffusion_model,
    to_diffusers,
)
from engine.files.headers import Tensor, read_header
from engine.files.scaled_fp8 import dequantised, kept_dtype
from engine.files.tensors import check_tensors
from engine.settings import CONFIGS_DIR, Settings

ALL_IN_ONE = "model.diffusion_model."
FAMILIES = {  # family: (tiny tensors, config folder, diffusers class)
    "flux1": (flux1_tensors, "flux1-dev", FluxTransformer2DModel),
    "flux2": (flux2_tensors, "flux2-klein", Flux2Transformer2DModel),
    "z-image": (z_image_tensors, "z-image", ZImageTransformer2DModel),
}
EXPECTED_NUMBERS = {
    "flux1": {"latent_channels": 16, "context_dim": 32, "pooled_dim": 32, "guidance": True, "double_blocks": 2},
    "flux2": {"latent_channels": 32, "context_dim": 96, "guidance": False, "double_blocks": 1, "single_blocks": 2},
    "z-image": {"latent_channels": 16, "context_dim": 32, "guidance": False, "layers": 2, "refiner_layers": 1},
}
FOLDERS = ("z-image", "flux2-klein", "flux1-dev", "flux1-schnell")
FOLDER_TYPES = {"z-image": "z-image", "flux2-klein": "flux2", "flux1-dev": "flux1", "flux1-schnell": "flux1"}
FLUX1_NUMBERS = {
    "latent_channels": 16,
    "context_dim": 4096,
    "pooled_dim": 768,
    "double_blocks": 19,
    "single_blocks": 38,
}
RELEASED_NUMBERS = {  # as the model cards and BFL's and Tongyi's code have them
    "z-image": {"latent_channels": 16, "context_dim": 2560, "hidden": 3840, "heads": 30, "head_dim": 128, "layers": 30},
    "flux2-klein": {"latent_channels": 32, "context_dim": 7680, "hidden": 3072, "heads": 24, "double_blocks": 5},
    "flux1-dev": {**FLUX1_NUMBERS, "single_blocks": 38, "guidance": True, "hidden": 3072, "heads": 24, "head_dim": 128},
    "flux1-schnell": {**FLUX1_NUMBERS, "guidance": False},
}
# BFL's Klein9BParams: 8 double and 24 single blocks, 32 heads of 128, three layers of Qwen3-8B's 4096
KLEIN_9B_NUMBERS = {"latent_channels": 32, "context_dim": 12288, "hidden": 4096, "heads": 32, "double_blocks": 8}
KLEIN_9B_NUMBERS |= {"single_blocks": 24, "guidance": False}
PUBLISHED_PARAMETERS = {  # Z-Image 6.15B, FLUX.2 klein 4B, FLUX.1 12B (schnell has no guidance embedder)
    "z-image": 6_154_908_736,
    "flux2-klein": 3_875_544_576,
    "flux1-dev": 11_901_408_320,
    "flux1-schnell": 11_891_178_560,
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A configs folder with the tiny transformer configs."""
    path = tmp_path_factory.mktemp("configs")
    write_tiny_transformer_configs(path)
    return path


def save(path, tensors, prefix=""):
    save_file({prefix + name: tensor.contiguous() for name, tensor in tensors.items()}, path)
    return path


def loaded(path, configs, family_folder, dtype=torch.float32):
    part = recognise_diffusion_model(read_header(path))
    return load_diffusion_model(path, part, configs / family_folder, dtype)


def forward(model, family):
    """One forward pass of a tiny model on a 4x4-token picture and 5 text tokens; the output."""
    generator = torch.Generator().manual_seed(1)
    dtype = model.dtype  # the compute dtype, for an fp8 model too

    def noise(*shape):
        return torch.randn(shape, generator=generator).to(dtype)

    if family == "z-image":
        return model([noise(16, 1, 8, 8)], torch.tensor([0.5]), [noise(5, 32)], return_dict=False)[0][0]
    if family == "flux1":
        img_ids, txt_ids = torch.zeros(16, 3), torch.zeros(5, 3)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
        return model(
            hidden_states=noise(1, 16, 64),
            encoder_hidden_states=noise(1, 5, 32),
            pooled_projections=noise(1, 32),
            timestep=torch.tensor([0.5]),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]
    img_ids, txt_ids = torch.zeros(1, 16, 4), torch.zeros(1, 5, 4)
    img_ids[0, :, 1], img_ids[0, :, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    txt_ids[0, :, 3] = torch.arange(5)
    return model(
        hidden_states=noise(1, 16, 128),
        encoder_hidden_states=noise(1, 5, 96),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None,
        return_dict=False,
    )[0]


@pytest.mark.parametrize("prefix", ["", ALL_IN_ONE], ids=["own-file", "all-in-one"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_recognised_in_its_own_file_and_in_an_all_in_one_checkpoint(tmp_path, family, prefix):
    tensors, _, _ = FAMILIES[family]
    part = recognise_diffusion_model(read_header(save(tmp_path / "model.safetensors", tensors(), prefix)))
    assert (part.kind, part.type, part.prefix) == ("diffusion_model", family, prefix)
    assert part.numbers.items() >= EXPECTED_NUMBERS[family].items()
    assert (part.numbers["hidden"], part.numbers["heads"], part.numbers["head_dim"]) == (32, 2, 16)
    assert part.numbers["dtype"] == "BF16"


def test_flux1_dev_and_schnell_are_told_apart_by_the_guidance_embedder(tmp_path):
    dev = recognise_diffusion_model(read_header(save(tmp_path / "dev.safetensors", flux1_tensors(guidance=True))))
    schnell = recognise_diffusion_model(read_header(save(tmp_path / "s.safetensors", flux1_tensors(guidance=False))))
    assert (dev.type, dev.numbers["guidance"]) == ("flux1", True)
    assert (schnell.type, schnell.numbers["guidance"]) == ("flux1", False)


def test_a_stable_diffusion_checkpoint_holds_no_transformer(tmp_path):
    sd = {
        ALL_IN_ONE + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        ALL_IN_ONE + "out.2.weight": torch.zeros(4, 320, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 768),
    }
    assert recognise_diffusion_model(read_header(save(tmp_path / "sd.safetensors", sd))) is None


def test_a_header_with_the_right_names_but_impossible_shapes_is_no_model():
    header = full_size_header(CONFIGS_DIR / "flux2-klein")
    damaged = {**header, "img_in.weight": Tensor((3072,), "BF16")}
    assert recognise_diffusion_model(damaged) is None
    no_heads = {**header, "double_blocks.0.img_attn.norm.query_norm.scale": Tensor((0,), "BF16")}
    assert recognise_diffusion_model(no_heads) is None


@pytest.mark.parametrize("prefix", ["", ALL_IN_ONE], ids=["own-file", "all-in-one"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_exactly_the_weights_written_and_runs(tmp_path, configs, family, prefix, no_network):
    tensors, folder, model_class = FAMILIES[family]
    path = save(tmp_path / "model.safetensors", tensors(), prefix)
    model = loaded(path, configs, folder, torch.bfloat16)
    assert type(model) is model_class and not model.training
    # what the original layout converts to is exactly the diffusers model the tiny file was made from
    expected = tiny_model_state(TINY_CONFIGS[folder], torch.bfloat16)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    assert torch.isfinite(forward(model, family).float()).all()


def test_a_flux1_with_fewer_double_blocks_loads_with_that_count(tmp_path, configs):
    # pruned FLUX.1 variants (FLUX.1-lite) drop double blocks; the config folder is the full model's
    path = save(tmp_path / "lite.safetensors", flux1_tensors(double_blocks=1, single_blocks=3))
    model = loaded(path, configs, "flux1-dev")
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (1, 3)
    assert torch.isfinite(forward(model, "flux1")).all()


def test_a_schnell_file_loads_through_the_schnell_config_without_a_guidance_embedder(tmp_path, configs):
    model = loaded(save(tmp_path / "schnell.safetensors", flux1_tensors(guidance=False)), configs, "flux1-schnell")
    assert not model.config.guidance_embeds


def test_a_model_of_another_width_is_refused_naming_the_width(tmp_path, configs):
    wider = tmp_path / "configs"
    shutil.copytree(configs / "flux2-klein", wider / "flux2-klein")
    config_path = wider / "flux2-klein" / "transformer" / "config.json"
    config_path.write_text(json.dumps({**TINY_CONFIGS["flux2-klein"], "joint_attention_dim": 64}))
    with pytest.raises(ImagineError) as refused:
        loaded(save(tmp_path / "klein.safetensors", flux2_tensors()), wider, "flux2-klein")
    assert refused.value.status == 422
    assert "text feature width is 96" in refused.value.message and "64" in refused.value.message
    assert str(tmp_path) not in refused.value.message


def test_a_klein_of_the_9b_width_loads_through_the_9b_config(tmp_path, configs, no_network):
    path = save(tmp_path / "flux-2-klein-9b.safetensors", flux2_tensors(size="flux2-klein/transformer-9b"))
    model = loaded(path, configs, "flux2-klein", torch.bfloat16)
    assert (model.config.num_attention_heads, model.config.joint_attention_dim) == (3, 144)
    expected = tiny_model_state(TINY_CONFIGS["flux2-klein/transformer-9b"], torch.bfloat16)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in expected.items())


def test_a_klein_of_neither_width_is_refused_naming_both_architectures(tmp_path, configs):
    other = tmp_path / "configs"
    shutil.copytree(configs / "flux2-klein", other / "flux2-klein")
    narrower = {**TINY_CONFIGS["flux2-klein"], "joint_attention_dim": 64}
    (other / "flux2-klein" / "transformer" / "config.json").write_text(json.dumps(narrower))
    with pytest.raises(ImagineError) as refused:
        loaded(save(tmp_path / "klein.safetensors", flux2_tensors()), other, "flux2-klein")
    assert refused.value.status == 422
    nine = TINY_CONFIGS["flux2-klein/transformer-9b"]
    nine_wide = nine["num_attention_heads"] * nine["attention_head_dim"]
    assert refused.value.message.endswith(  # each architecture's own first difference
        f"its text feature width is 96 where the architecture's is 64; its hidden width is 32 where 9b's is {nine_wide}"
    )


def test_a_model_of_another_family_than_its_config_is_refused(tmp_path, configs):
    with pytest.raises(ImagineError) as refused:
        loaded(save(tmp_path / "z.safetensors", z_image_tensors()), configs, "flux1-dev")
    assert refused.value.status == 422 and "Z-Image" in refused.value.message


@pytest.mark.parametrize(
    "family, missing",
    [
        ("flux1", "double_blocks.1.img_attn.proj.weight"),
        ("flux2", "single_blocks.1.linear2.weight"),
        ("z-image", "layers.1.feed_forward.w2.weight"),
    ],
)
def test_a_file_missing_a_tensor_is_refused_naming_it(tmp_path, configs, family, missing):
    tensors, folder, _ = FAMILIES[family]
    cut = tensors()
    del cut[missing]
    with pytest.raises(ImagineError) as refused:
        loaded(save(tmp_path / "cut.safetensors", cut), configs, folder)
    assert refused.value.status == 422
    # FLUX.1's converter names the original tensor; the others the diffusers name it converts to
    named = {"flux1": missing, "flux2": "single_transformer_blocks.1.attn.to_out.weight"}
    assert named.get(family, "layers.1.feed_forward.w2.weight") in refused.value.message


@pytest.mark.parametrize("family", FAMILIES)
def test_a_file_with_an_unknown_tensor_is_refused_naming_it(tmp_path, configs, family):
    tensors, folder, _ = FAMILIES[family]
    extra = {**tensors(), "extra_block.weight": torch.zeros(2)}
    with pytest.raises(ImagineError) as refused:
        loaded(save(tmp_path / "extra.safetensors", extra), configs, folder)
    assert refused.value.status == 422 and "extra_block.weight" in refused.value.message


@pytest.mark.parametrize("family", FAMILIES)
def test_an_fp8_file_stays_fp8_in_memory_and_runs_in_the_compute_dtype(tmp_path, configs, family, no_network):
    tensors, folder, _ = FAMILIES[family]
    # as fp8 releases are: the matrices fp8, the small vectors (biases, norms, pad tokens) bf16
    written = {
        name: tensor.to(torch.float8_e4m3fn) if tensor.dim() == 2 and min(tensor.shape) > 1 else tensor
        for name, tensor in tensors().items()
    }
    path = save(tmp_path / "fp8.safetensors", written)
    part = recognise_diffusion_model(read_header(path))
    assert part.numbers["dtype"] == "F8_E4M3"
    model = load_diffusion_model(path, part, configs / folder, torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters()}
    assert torch.float8_e4m3fn in dtypes and dtypes <= {torch.float8_e4m3fn, torch.bfloat16}
    assert model.dtype == torch.bfloat16  # what the pipelines cast their inputs to
    output = forward(model, family)
    assert output.dtype == torch.bfloat16 and torch.isfinite(output.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_comfyui_scaled_fp8_file_loads_with_its_scales_multiplied_out(tmp_path, configs, family, no_network):
    tensors, folder, _ = FAMILIES[family]
    written = scaled_fp8_tensors(tensors())
    path = save(tmp_path / "scaled.safetensors", written)
    part = recognise_diffusion_model(read_header(path))
    assert part.numbers["scaled"]
    model = load_diffusion_model(path, part, configs / folder, torch.float32)
    expected = tiny_model_state(TINY_CONFIGS[folder], torch.float32)
    state = model.state_dict()
    big = [name for name, tensor in expected.items() if tensor.dim() == 2 and min(tensor.shape) > 1]
    dtypes = {state[name].dtype for name in big}  # multiplied out, half of float32 (norms and the like: float32)
    assert torch.bfloat16 in dtypes and dtypes <= {torch.bfloat16, torch.float32}
    for name in big:  # within fp8's rounding of each weight (3 bits of mantissa) and bf16's of the product
        assert torch.allclose(state[name].float(), expected[name], rtol=0.07, atol=2e-3), name
    assert torch.isfinite(forward(model, family)).all()


def test_a_scaled_fp8_weight_is_multiplied_out_in_float32_and_rounded_once_to_a_16_bit_compute_dtype():
    values = torch.randn(64, 64).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.0123)
    for dtype in (torch.float16, torch.bfloat16):
        kept = dequantised({"w.weight": values, "w.weight_scale": scale}, kept_dtype(dtype))
        assert kept.keys() == {"w.weight"} and torch.equal(kept["w.weight"], (values.float() * scale).to(dtype))
    assert kept_dtype(torch.float32) == torch.bfloat16  # half float32's memory


def test_a_scaled_fp8_file_computed_in_float16_loads_and_runs_in_float16(tmp_path, configs):
    tensors, folder, _ = FAMILIES["z-image"]
    path = save(tmp_path / "scaled.safetensors", scaled_fp8_tensors(tensors()))
    model = load_diffusion_model(path, recognise_diffusion_model(read_header(path)), configs / folder, torch.float16)
    expected = tiny_model_state(TINY_CONFIGS[folder], torch.float32)
    state = model.state_dict()
    big = [name for name, tensor in expected.items() if tensor.dim() == 2 and min(tensor.shape) > 1]
    assert {state[name].dtype for name in big} == {torch.float16}
    for name in big:
        assert torch.allclose(state[name].float(), expected[name], rtol=0.07, atol=2e-3), name
    assert torch.isfinite(forward(model, "z-image").float()).all()


def test_a_file_scaled_per_block_is_refused_naming_its_format_before_its_packed_shapes_are_read(tmp_path):
    tensors, _, _ = FAMILIES["z-image"]
    path = save(tmp_path / "z_image_turbo_nvfp4.safetensors", nvfp4_tensors(tensors()))
    with pytest.raises(ImagineError) as refused:
        Catalog(Settings(), {}).family_of(str(path))
    assert refused.value.status == 422
    assert "scales, one per block (ComfyUI's nvfp4 format)" in refused.value.message, refused.value.message


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_shipped_transformer_configs_have_the_published_sizes(folder):
    config = json.loads((CONFIGS_DIR / folder / "transformer" / "config.json").read_text())
    assert sum(p.numel() for p in meta_model(config).parameters()) == PUBLISHED_PARAMETERS[folder]


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_full_size_file_is_recognised_with_the_released_numbers_and_fits_its_config(folder):
    # the header of a real-size file, made on the meta device: no weights, no memory
    header = full_size_header(CONFIGS_DIR / folder)
    part = recognise_diffusion_model(header)
    assert part.type == FOLDER_TYPES[folder] and part.numbers.items() >= RELEASED_NUMBERS[folder].items()
    config = fitted_config(part, CONFIGS_DIR / folder)
    tensors = {name: torch.empty(tensor.shape, device="meta") for name, tensor in header.items()}
    check_tensors(to_diffusers(part, tensors), meta_model(config).state_dict(), REFUSALS)


def test_the_shipped_klein_9b_config_has_the_released_numbers_and_the_size_its_name_gives():
    header = full_size_header(CONFIGS_DIR / "flux2-klein", "transformer-9b")
    part = recognise_diffusion_model(header)
    assert part.type == "flux2" and part.numbers.items() >= KLEIN_9B_NUMBERS.items()
    config = fitted_config(part, CONFIGS_DIR / "flux2-klein")
    assert config["joint_attention_dim"] == 12288
    tensors = {name: torch.empty(tensor.shape, device="meta") for name, tensor in header.items()}
    check_tensors(to_diffusers(part, tensors), meta_model(config).state_dict(), REFUSALS)
    assert round(sum(p.numel() for p in meta_model(config).parameters()) / 1e9) == 9  # 9,078,581,248


def test_the_shipped_schedulers_shift_as_the_released_models_do():
    def scheduler(family):
        return json.loads((CONFIGS_DIR / family / "scheduler" / "scheduler_config.json").read_text())

    assert (
        scheduler("flux1-dev").items() >= {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}.items()
    )
    assert (scheduler("flux1-dev")["shift"], scheduler("flux1-schnell")["shift"]) == (3.0, 1.0)
    assert not scheduler("flux1-schnell")["use_dynamic_shifting"]
    assert (scheduler("z-image")["shift"], scheduler("z-image")["use_dynamic_shifting"]) == (3.0, False)
    assert scheduler("flux2-klein")["use_dynamic_shifting"]
    index = {
        family: json.loads((CONFIGS_DIR / family / "model_index.json").read_text()) for family in PUBLISHED_PARAMETERS
    }
    assert {family: value["_class_name"] for family, value in index.items()} == {
        "z-image": "ZImagePipeline",
        "flux2-klein": "Flux2KleinPipeline",
        "flux1-dev": "FluxPipeline",
        "flux1-schnell": "FluxPipeline",
    }
