"""The shipped configs fit real checkpoints: a random-weight file with the exact SD1.5 architecture.

It runs in CI, as SD1.5 files are what most users have: about 30 s and 2 GB written to a temp dir,
never kept. It builds the real-size UNet, VAE and text encoder with random weights, writes them in
fp16 as a single .safetensors file in the original LDM layout (as dreamshaper_8.safetensors is),
loads it through configs/sd1 with the network unavailable, and generates."""

import gc

import pytest
import torch
from conftest import decode_png
from ldm_checkpoint import ldm_state_dict, random_sd15_modules
from safetensors.torch import save_file

import imagine
from engine.engine import Engine
from engine.settings import CONFIGS_DIR

SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.fixture(scope="module")
def sd15_checkpoint(tmp_path_factory):
    """(models dir, the fp16 LDM state dict written there as sd15-random.safetensors)."""
    modules = random_sd15_modules(CONFIGS_DIR / "sd1")
    assert {name: sum(p.numel() for p in m.parameters()) for name, m in vars(modules).items()} == SD15_PARAMETERS
    state = ldm_state_dict(modules, dtype=torch.float16)
    del modules
    gc.collect()
    models = tmp_path_factory.mktemp("sd15")
    save_file(state, models / "sd15-random.safetensors")
    return models, state


def test_an_sd15_architecture_checkpoint_loads_offline_through_the_shipped_configs(sd15_checkpoint, no_network):
    models, state = sd15_checkpoint
    # float32 holds the fp16 weights exactly (bfloat16, which `auto` may pick on a CPU, would round them)
    engine = Engine(imagine.Settings(model="sd15-random", models_dir=models, fp_prec="32"))
    engine.start()
    client = imagine.create_app(engine).test_client()
    response = client.post("/generate", json={"prompt": "an astronaut", "width": 64, "height": 64, "num_steps": 2})
    assert response.status_code == 200, response.get_json()
    assert decode_png(response.get_json()["img"]).size == (64, 64)

    loaded = engine.models.get(engine.catalog.resolve(None)).txt2img
    assert loaded.unet.dtype == engine.dtype and loaded.unet.config.cross_attention_dim == 768
    reloaded = ldm_state_dict(loaded, dtype=torch.float16)
    assert reloaded.keys() == state.keys()
    assert all(torch.equal(reloaded[key], state[key]) for key in state)
