"""Imagine's samplers against AUTOMATIC1111's on a random-weight SD1.5-architecture checkpoint: the same UNet sampled
by k-diffusion's own functions with A1111's noise and sigmas (tests/test_a1111_sampling.py's reference), and the
mean pixel difference per sampler, schedule and step count. Minutes on a CPU; CI runs the same on the tiny model.

    pip install --no-deps k-diffusion
    python bench/a1111_parity.py --size 256 --steps 4 20
"""

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import kdiffusion_reference  # noqa: E402
import test_a1111_sampling as parity  # noqa: E402
from ldm_checkpoint import ldm_state_dict, random_sd15_modules  # noqa: E402

import imagine  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.settings import CONFIGS_DIR  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="picture size in pixels (default 256)")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 20], help="step counts (default 4 20)")
    parser.add_argument("--rng", default="cpu", help="cpu, gpu or nv (default cpu)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        modules = random_sd15_modules(CONFIGS_DIR / "sd1")
        save_file(ldm_state_dict(modules, dtype=torch.float16), Path(folder) / "sd15-random.safetensors")
        del modules
        gc.collect()
        engine = Engine(imagine.Settings(model="sd15-random", models_dir=Path(folder), fp_prec="32"))
        engine.start()
        client = imagine.create_app(engine).test_client()
        client.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "num_steps": 1})
        pipe = engine.models.get(engine.catalog.resolve(None)).txt2img
        k_diffusion, conditioning = kdiffusion_reference.load(), parity.encoded_prompts(pipe)
        print(f"SD1.5 architecture, random weights, {args.size}x{args.size}, two pictures each:", flush=True)
        for sampler, schedule in parity.CONTRACT:
            for steps in args.steps:  # mean_difference prints each line
                parity.mean_difference(
                    client, pipe, k_diffusion, conditioning, sampler, schedule, steps, args.rng, args.size
                )


if __name__ == "__main__":
    main()
