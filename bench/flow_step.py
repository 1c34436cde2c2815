#!/usr/bin/env python3
"""Times one denoising step of a flow-matching family's transformer at its released size on this machine: random
weights of the exact architecture in an fp8 file (as people download them to save memory; 4-12 GB in
/tmp/imagine-bench, kept for the next run), loaded as Imagine loads it, one forward pass at the given picture size
with the family's 512 prompt tokens, in float32 or bfloat16. Speed does not depend on the weights' values.

    python bench/flow_step.py --family flux2-klein --size 256 --dtype float32
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from diffusion_model_files import full_size_header, random_fp8_file  # noqa: E402

import engine.models  # noqa: E402, F401 (turns the libraries' progress bars off)
from engine.files.diffusion_models import load_diffusion_model, recognise_diffusion_model  # noqa: E402
from engine.files.headers import read_header  # noqa: E402
from engine.settings import CONFIGS_DIR  # noqa: E402

PROMPT_TOKENS = 512


def step_inputs(part, size: int, dtype) -> dict:
    """A step's inputs for the transformer of `part` drawing a `size` x `size` picture."""
    tokens = (size // 16) ** 2  # 1/8 latents, packed 2x2
    numbers = part.numbers
    if part.type == "z-image":
        latents = [torch.randn(numbers["latent_channels"], 1, size // 8, size // 8, dtype=dtype)]
        prompt = [torch.randn(PROMPT_TOKENS, numbers["context_dim"], dtype=dtype)]
        return {"x": latents, "t": torch.tensor([0.5]), "cap_feats": prompt, "return_dict": False}
    ids = 4 if part.type == "flux2" else 3
    inputs = {
        "hidden_states": torch.randn(1, tokens, numbers["in_channels"], dtype=dtype),
        "encoder_hidden_states": torch.randn(1, PROMPT_TOKENS, numbers["context_dim"], dtype=dtype),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(tokens, ids),
        "txt_ids": torch.zeros(PROMPT_TOKENS, ids),
        "guidance": torch.tensor([3.5]) if numbers["guidance"] else None,
        "return_dict": False,
    }
    if part.type == "flux1":
        inputs["pooled_projections"] = torch.randn(1, numbers["pooled_dim"], dtype=dtype)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("z-image", "flux2-klein", "flux1-dev", "flux1-schnell"), required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the compute precision")
    args = parser.parse_args()
    path = Path("/tmp/imagine-bench") / f"{args.family}-fp8.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = {name: tensor.shape for name, tensor in full_size_header(CONFIGS_DIR / args.family).items()}
        random_fp8_file(path, shapes)
    part = recognise_diffusion_model(read_header(path))
    dtype = getattr(torch, args.dtype)
    model = load_diffusion_model(path, part, CONFIGS_DIR / args.family, dtype)
    inputs = step_inputs(part, args.size, dtype)
    started = time.perf_counter()
    with torch.inference_mode():
        model(**inputs)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.family} {args.size}x{args.size} {args.dtype}: one step {seconds:.1f} s, peak resident {peak:.1f} GB")


if __name__ == "__main__":
    main()
