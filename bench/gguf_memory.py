"""What a GGUF diffusion model takes in memory against its bf16 file: shallow transformers of the released widths
(Z-Image 3840 wide, FLUX.2 klein 4B and FLUX.1 3072 wide, each with a few of its blocks), random weights written as
bf16 .safetensors and as GGUF Q8_0 and Q4_0 (tests/gguf_model_files.py, as ComfyUI-GGUF writes them), each loaded by
Imagine's loader in a fresh process and run once at 256x256 in bfloat16; the process's resident memory once loaded
and after that step, less what it held before loading. docs/performance.md has the figures.

    python bench/gguf_memory.py            # about 4 GB of disk in a temp dir and 3 GB of memory at most
"""

import argparse
import gc
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from diffusion_model_files import meta_model, original_layout, random_state  # noqa: E402
from gguf_model_files import Q, write_gguf  # noqa: E402

from engine.files.diffusion_models import load_diffusion_model, recognise_diffusion_model  # noqa: E402
from engine.files.headers import read_any_header  # noqa: E402
from engine.settings import CONFIGS_DIR  # noqa: E402

SHALLOW = {  # config folder: (family, the block counts built: a few of the released model's)
    "z-image": ("z-image", {"n_layers": 2, "n_refiner_layers": 1}),
    "flux2-klein": ("flux2", {"num_layers": 1, "num_single_layers": 2}),
    "flux1-schnell": ("flux1", {"num_layers": 1, "num_single_layers": 2}),
}
TOKENS, TEXT_TOKENS = 256, 32  # a 256x256 picture: 32x32 latents in 2x2 patches; a short prompt


def write_files(folder: Path, name: str) -> list:
    """The shallow model of config folder `name` as bf16 .safetensors, GGUF Q8_0 and GGUF Q4_0; their paths."""
    family, blocks = SHALLOW[name]
    config = {**json.loads((CONFIGS_DIR / name / "transformer" / "config.json").read_text()), **blocks}
    tensors = original_layout(random_state(meta_model(config), torch.bfloat16), config)
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, folder / f"{name}-bf16.safetensors")
    paths = [folder / f"{name}-bf16.safetensors"]
    for kind in (Q.Q8_0, Q.Q4_0):
        paths.append(write_gguf(folder / f"{name}-{kind.name}.gguf", tensors, family, kind))
    return paths


def one_step(model, family: str) -> torch.Tensor:
    """One forward pass of the transformer on random latents and text features of the sizes above."""

    def noise(*shape):
        return torch.randn(shape, dtype=torch.bfloat16)

    timestep = torch.tensor([0.5])
    width = model.config.cap_feat_dim if family == "z-image" else model.config.joint_attention_dim
    if family == "z-image":
        return model([noise(16, 1, 32, 32)], timestep, [noise(TEXT_TOKENS, width)], return_dict=False)[0][0]
    ids = torch.zeros(TOKENS, 3 if family == "flux1" else 4)
    text_ids = torch.zeros(TEXT_TOKENS, ids.shape[1])
    extra = {"pooled_projections": noise(1, 768)} if family == "flux1" else {}
    return model(
        hidden_states=noise(1, TOKENS, model.config.in_channels),
        encoder_hidden_states=noise(1, TEXT_TOKENS, width),
        timestep=timestep,
        img_ids=ids if family == "flux1" else ids[None],
        txt_ids=text_ids if family == "flux1" else text_ids[None],
        guidance=None,
        return_dict=False,
        **extra,
    )[0]


def measure(path: Path, name: str) -> dict:
    """Resident memory the model at `path` adds once loaded and run one step; in this process."""
    family = SHALLOW[name][0]
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    part = recognise_diffusion_model(read_any_header(path))
    model = load_diffusion_model(path, part, CONFIGS_DIR / name, torch.bfloat16)
    gc.collect()
    loaded = process.memory_info().rss - before
    with torch.inference_mode():
        one_step(model, family)
    gc.collect()
    stepped = process.memory_info().rss - before
    parameters = sum(math.prod(p.quant_shape if hasattr(p, "quant_shape") else p.shape) for p in model.parameters())
    return {"file": path.name, "size": path.stat().st_size, "parameters": parameters, "loaded": loaded, "run": stepped}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "CONFIG"), help="(internal) measure one file")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return
    print("| file | parameters | file size | resident once loaded | after one step | bytes per parameter (after) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in SHALLOW:
            paths = write_files(Path(folder), name)
            for path in paths:
                result = subprocess.run(
                    [sys.executable, __file__, "--measure", str(path), name], capture_output=True, text=True, check=True
                )
                row = json.loads(result.stdout.splitlines()[-1])
                per = row["run"] / row["parameters"]
                print(f"| {row['file']} | {row['parameters'] / 1e6:.0f} M | {row['size'] / 1e6:.0f} MB | "
                      f"{row['loaded'] / 1e6:.0f} MB | {row['run'] / 1e6:.0f} MB | {per:.2f} |",
                      flush=True)  # fmt: skip
            for path in paths:
                path.unlink()


if __name__ == "__main__":
    main()
