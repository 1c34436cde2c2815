"""The shipped Z-Image and FLUX.2 klein configs fit files of the released size: random weights of the exact
architectures, stored in fp8 as people download them to save memory, loaded offline and drawn with (256x256, one
step), with the time and memory each takes printed (`-s` shows them; docs/performance.md has the figures).

Slow and opt-in (`python -m pytest -m slow tests/test_full_size_families.py -s`): the files take 11-12 GB of disk
(klein 9B's 17 GB) in a temp dir, never kept. It computes as the server would by default (`-f auto`: bfloat16 where
the CPU has it, else float32), and loading an fp8 text encoder passes through that precision: 19.5 GB of memory at
the peak in float32 (klein, measured). klein 9B (with Qwen3-8B) and FLUX.1 (12B, with T5-XXL) need more than a
machine of 24 GB has beside that; they run where 42 and 48 GB are free.
"""

import resource
import time

import psutil
import pytest
import torch
import transformers
from conftest import decode_png
from diffusion_model_files import full_size_header, random_fp8_file
from encoder_files import ae_tensors, clip_l_tensors, flux2_vae_tensors
from safetensors.torch import save_file

import imagine
from engine.engine import Engine
from engine.settings import CONFIGS_DIR

pytestmark = pytest.mark.slow


def meta_shapes(model_class, config_dir, prefix: str = "", **numbers) -> dict:
    config = transformers.AutoConfig.from_pretrained(config_dir, **numbers)
    with torch.device("meta"):
        model = model_class(config)
    return {prefix + name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def transformer_shapes(family: str, transformer: str = "transformer") -> dict:
    return {name: tensor.shape for name, tensor in full_size_header(CONFIGS_DIR / family, transformer).items()}


FAMILIES = {
    "z-image": lambda: {
        "diffusion_models/z_image_turbo_fp8.safetensors": transformer_shapes("z-image"),
        "text_encoders/qwen_3_4b_fp8.safetensors": meta_shapes(
            transformers.Qwen3Model, CONFIGS_DIR / "z-image" / "text_encoder", "model."
        ),
        "vae/ae.safetensors": ae_tensors(numbers={}),
    },
    "flux2-klein": lambda: {
        "diffusion_models/flux-2-klein-4b-fp8.safetensors": transformer_shapes("flux2-klein"),
        "text_encoders/qwen_3_4b_fp8.safetensors": meta_shapes(
            transformers.Qwen3Model, CONFIGS_DIR / "z-image" / "text_encoder", "model."
        ),
        "vae/flux2-vae.safetensors": flux2_vae_tensors(numbers={}),
    },
    "flux2-klein-9b": lambda: {
        "diffusion_models/flux-2-klein-9b-fp8.safetensors": transformer_shapes("flux2-klein", "transformer-9b"),
        "text_encoders/qwen_3_8b_fp8.safetensors": meta_shapes(  # Qwen3-8B: 4096 wide, the 4B's depth and heads
            transformers.Qwen3Model,
            CONFIGS_DIR / "z-image" / "text_encoder",
            "model.",
            hidden_size=4096,
            intermediate_size=12288,
        ),
        "vae/flux2-vae.safetensors": flux2_vae_tensors(numbers={}),
    },
    "flux1-schnell": lambda: {
        "diffusion_models/flux1-schnell-fp8.safetensors": transformer_shapes("flux1-schnell"),
        "text_encoders/t5xxl_fp8_e4m3fn.safetensors": meta_shapes(
            transformers.T5EncoderModel, CONFIGS_DIR / "flux1-dev" / "text_encoder_2"
        ),
        "text_encoders/clip_l.safetensors": clip_l_tensors(),
        "vae/ae.safetensors": ae_tensors(numbers={}),
    },
}
# free GB, float32 compute: klein 4B measured; the others scaled by their files' sizes
NEEDS_GB = {"z-image": 24, "flux2-klein": 21, "flux2-klein-9b": 42, "flux1-schnell": 48}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_released_architecture_loads_offline_and_draws(family, tmp_path, no_network):
    available = psutil.virtual_memory().available / 2**30
    if available < NEEDS_GB[family]:
        pytest.skip(f"{family} needs about {NEEDS_GB[family]} GB of free memory; {available:.0f} GB are free")
    model = None
    for name, content in FAMILIES[family]().items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(next(iter(content.values())), torch.Tensor):
            save_file({key: value.contiguous() for key, value in content.items()}, str(path))
        else:
            random_fp8_file(path, {key: tuple(shape) for key, shape in content.items()})
        model = model or path.stem
    engine = Engine(imagine.Settings(model="demo", models_dir=tmp_path))
    engine.start()
    client = imagine.create_app(engine).test_client()
    started = time.perf_counter()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}).status_code == 200
    loaded = time.perf_counter()
    body = {"prompt": "a lighthouse at dusk", "model": model, "width": 256, "height": 256, "num_steps": 1, "seed": 1}
    response = client.post("/generate", json=body)
    drawn = time.perf_counter()
    assert response.status_code == 200, response.get_json()
    assert decode_png(response.get_json()["img"]).size == (256, 256)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{family}: loaded in {loaded - started:.0f} s, one 256x256 step drawn in {drawn - loaded:.0f} s, "
          f"peak memory {peak:.1f} GB ({engine.dtype} compute, {torch.get_num_threads()} threads)")  # fmt: skip
    engine.stop()
