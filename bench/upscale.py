#!/usr/bin/env python3
"""Time and peak memory of one upscale as the engine runs it (Upscalers.upscale, tiled), with a model of
RealESRGAN_x4plus's exact architecture (23 RRDB blocks of 64 features) and random weights: speed and memory do not
depend on the weight values.

    python bench/upscale.py                               # a 1024x1024 picture made 4x larger (4096x4096)
    python bench/upscale.py --size 256                    # one tile's worth: 256x256 to 1024x1024
    python bench/upscale.py --device cuda --fp 16         # on a GPU, in float16 (a CPU runs upscalers in float32)

Prints one line: the picture's size, the precision, the seconds of the upscale (the model already loaded) and the
process's peak resident memory (ru_maxrss), which includes torch itself and the model.
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import noise_picture  # noqa: E402
from upscaler_files import esrgan, import_spandrel  # noqa: E402

from engine.devices import pick_device, pick_dtype  # noqa: E402
from engine.upscalers import Upscalers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="the input picture's width and height")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--fp", choices=("16", "32"), default="32", help="precision, as --fp_prec (16: a GPU's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    import_spandrel()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as models_dir:
        (Path(models_dir) / "upscale_models").mkdir()
        path = Path(models_dir) / "upscale_models" / "RealESRGAN_x4plus.safetensors"
        safetensors.torch.save_file(esrgan(features=64, blocks=23), path)
        upscalers = Upscalers(models_dir, device, pick_dtype(args.fp, device))
        upscalers.model(upscalers.find("RealESRGAN_x4plus"))  # loaded before the clock starts
        image = noise_picture(args.size, args.size)
        started = time.perf_counter()
        result = upscalers.upscale(image, "RealESRGAN_x4plus", args.scale)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    cuda = f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU" if device.type == "cuda" else ""
    print(
        f"{image.width}x{image.height} -> {result.width}x{result.height}, fp{args.fp}, {device}: {seconds:.1f} s, "
        f"peak resident {peak:.2f} GiB{cuda}"
    )


if __name__ == "__main__":
    main()
