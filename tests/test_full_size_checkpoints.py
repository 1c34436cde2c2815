"""The shipped SDXL and SD2 configs fit real checkpoints: random-weight files with the exact SDXL base and
SD2.1-768 architectures, loaded offline and generated with.

Slow and opt-in (`python -m pytest -m slow`): the SDXL file is 5 GB (bfloat16) in a temp dir, never kept;
loading it takes about 6 GB of memory. Both load in 16 bits (bfloat16 on a CPU), whose weights can share
memory with the file's tensors while loading.
"""

import pytest
import torch
from conftest import decode_png
from ldm_checkpoint import ldm_shapes, save_random_checkpoint
from safetensors import safe_open

import imagine
from engine.engine import Engine
from engine.files.families import FAMILIES
from engine.settings import CONFIGS_DIR

pytestmark = pytest.mark.slow

SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
SD2_PARAMETERS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}

# SD2 files keep OpenCLIP ViT-H's 24th layer (SD2 conditions on the 23rd), its projection and logit scale.
SD2_UNUSED_TENSORS = {
    "cond_stage_model.model.text_projection": (1024, 1024),
    "cond_stage_model.model.logit_scale": (),
    **{
        f"cond_stage_model.model.transformer.resblocks.23.{name}": shape
        for name, shape in {
            "ln_1.weight": (1024,),
            "ln_1.bias": (1024,),
            "attn.in_proj_weight": (3072, 1024),
            "attn.in_proj_bias": (3072,),
            "attn.out_proj.weight": (1024, 1024),
            "attn.out_proj.bias": (1024,),
            "ln_2.weight": (1024,),
            "ln_2.bias": (1024,),
            "mlp.c_fc.weight": (4096, 1024),
            "mlp.c_fc.bias": (4096,),
            "mlp.c_proj.weight": (1024, 4096),
            "mlp.c_proj.bias": (1024,),
        }.items()
    },
}


def parameter(module, name):
    """A module's tensor by name, with or without transformers' optional `text_model.` level."""
    state = module.state_dict()
    return state[name] if name in state else state[name.removeprefix("text_model.")]


def serve_once(models, name):
    """Generates 64x64 in 2 steps from the checkpoint `name`; returns the engine's loaded model."""
    # Uncompiled: these check the configs, and compiling a full-size UNet would cost minutes (tests/test_compile.py).
    engine = Engine(imagine.Settings(model=name, models_dir=models, fp_prec="16", compile="off"))
    engine.start()
    response = (
        imagine.create_app(engine)
        .test_client()
        .post("/generate", json={"prompt": "an astronaut", "width": 64, "height": 64, "num_steps": 2, "seed": 1})
    )
    assert response.status_code == 200, response.get_json()
    assert decode_png(response.get_json()["img"]).size == (64, 64)
    return engine.models, engine.models.get(engine.catalog.resolve(None))


def assert_loaded_as_written(path, pipe, pairs, parameters):
    assert {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in parameters} == parameters
    with safe_open(str(path), framework="pt") as f:
        for ldm_key, (module, name, transform) in pairs.items():
            assert torch.equal(transform(f.get_tensor(ldm_key)), parameter(getattr(pipe, module), name)), ldm_key


def test_an_sdxl_base_architecture_checkpoint_loads_offline_and_generates(tmp_path, no_network):
    path = tmp_path / "sdxl-random.safetensors"
    save_random_checkpoint(ldm_shapes(CONFIGS_DIR / "sdxl", "sdxl"), path)
    models, model = serve_once(tmp_path, "sdxl-random")
    assert model.family is FAMILIES["sdxl"]
    same = lambda t: t  # noqa: E731
    assert_loaded_as_written(
        path,
        model.txt2img,
        {
            "model.diffusion_model.label_emb.0.0.weight": ("unet", "add_embedding.linear_1.weight", same),
            "model.diffusion_model.output_blocks.2.2.conv.weight": (
                "unet",
                "up_blocks.0.upsamplers.0.conv.weight",
                same,
            ),
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (
                "unet",
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
                same,
            ),
            "first_stage_model.decoder.up.0.block.2.conv2.weight": (
                "vae",
                "decoder.up_blocks.3.resnets.2.conv2.weight",
                same,
            ),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (
                "text_encoder",
                "text_model.encoder.layers.11.mlp.fc2.weight",
                same,
            ),
            "conditioner.embedders.1.model.text_projection": ("text_encoder_2", "text_projection.weight", torch.t),
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (
                "text_encoder_2",
                "text_model.encoder.layers.31.self_attn.v_proj.weight",
                lambda t: t[2560:],
            ),
        },
        SDXL_PARAMETERS,
    )
    models.unload(models.catalog.resolve(None))


def test_an_sd21_768_v_architecture_checkpoint_loads_offline_and_generates(tmp_path, no_network):
    path = tmp_path / "sd21-random.safetensors"
    save_random_checkpoint(ldm_shapes(CONFIGS_DIR / "sd2-v", "sd2") | SD2_UNUSED_TENSORS, path)
    (tmp_path / "sd21-random.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    models, model = serve_once(tmp_path, "sd21-random")
    assert model.family is FAMILIES["sd2-v"]
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    same = lambda t: t  # noqa: E731
    assert_loaded_as_written(
        path,
        model.txt2img,
        {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (
                "unet",
                "down_blocks.0.attentions.0.proj_in.weight",
                same,
            ),
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (
                "vae",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                same,
            ),
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (
                "text_encoder",
                "text_model.encoder.layers.22.self_attn.k_proj.weight",
                lambda t: t[1024:2048],
            ),
            "cond_stage_model.model.ln_final.weight": ("text_encoder", "text_model.final_layer_norm.weight", same),
        },
        SD2_PARAMETERS,
    )
    models.unload(models.catalog.resolve(None))
