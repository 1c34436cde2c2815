#!/usr/bin/env python3
"""What a TAESD preview costs: one preview's decode and PNG at the picture's size, beside the fast mapping's and a
denoising step's, and a whole generation streamed with a preview at every step (`stream: 1`) against none
(`stream: 0`), in rounds that alternate the two so that a busy machine slows them alike.

    python bench/taesd_preview.py                       # SD1.5 architecture, 512x512, 25 steps, 2 rounds
    python bench/taesd_preview.py --rounds 1 --steps 10

The model is a random-weight SD1.5-architecture checkpoint (2 GB in --workdir, built on the first run and kept) with
a random-weight TAESD decoder in vae_approx/ beside it: speed does not depend on the weight values. Imagine runs in
this process, on the engine's own thread, answering /generate through the Flask app as a client would see it.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ldm_checkpoint import ldm_state_dict, random_sd15_modules  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import engine.engine  # noqa: E402
import imagine  # noqa: E402
from engine.files.families import FAMILIES  # noqa: E402
from engine.files.taesd import tiny_decoder  # noqa: E402
from engine.previews import latents_to_preview, png_base64, taesd_preview  # noqa: E402
from engine.settings import CONFIGS_DIR  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imagine-bench"), help="the models folder it builds")
    parser.add_argument("--size", type=int, default=512, help="width and height (default 512)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per generation (default 25)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of stream 0 and stream 1 (default 2)")
    parser.add_argument("--decodes", type=int, default=10, help="timed preview decodes (default 10)")
    return parser.parse_args(argv)


def build_models_folder(folder: Path) -> str:
    """The random SD1.5 checkpoint (kept from an earlier run) and a random TAESD decoder; returns the model's name."""
    checkpoint = folder / "sd15-random.safetensors"
    if not checkpoint.is_file():
        print(f"building a random SD1.5-architecture checkpoint at {checkpoint} ...", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(ldm_state_dict(random_sd15_modules(CONFIGS_DIR / "sd1"), dtype=torch.float16), str(checkpoint))
    (folder / "vae_approx").mkdir(exist_ok=True)
    save_file(tiny_decoder(4).state_dict(), str(folder / "vae_approx" / "taesd_decoder.safetensors"))
    return checkpoint.stem


def median_seconds(call, repeats: int) -> tuple:
    """(median, min, max) seconds of `repeats` calls, after two untimed ones (the first calls set up each shape)."""
    call()
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


def preview_costs(size: int, repeats: int) -> dict:
    """Seconds of one preview at `size` x `size`, PNG and base64 included, as the engine sends it."""
    decoder = tiny_decoder(4).eval().requires_grad_(False)
    latents = torch.randn(1, 4, size // 8, size // 8)
    family = FAMILIES["sd1"]
    with torch.inference_mode():
        return {
            "TAESD decode": median_seconds(lambda: taesd_preview(decoder, latents), repeats),
            "TAESD decode + PNG": median_seconds(lambda: png_base64(taesd_preview(decoder, latents), None, 1), repeats),
            "fast mapping + PNG": median_seconds(
                lambda: png_base64(latents_to_preview(latents, family.latent_rgb, (size, size)), None, 1), repeats
            ),
        }


def time_previews(spent: list) -> None:
    """Adds each preview's build time (its decode, on the engine's thread) to `spent`: the cost the engine's share
    bounds, which a busy machine's noise does not blur as it blurs whole generations."""
    build = engine.engine.preview_image

    def timed(*args):
        started = time.perf_counter()
        image = build(*args)
        spent.append(time.perf_counter() - started)
        return image

    engine.engine.preview_image = timed


def generation(client, model: str, size: int, steps: int, stream: int) -> tuple:
    """(one generation's wall time, every line of its answer read; the steps of its previews, TAESD's)."""
    body = {"prompt": "a lighthouse at dusk", "model": model, "width": size, "height": size, "num_steps": steps,
            "seed": 1, "stream": stream}  # fmt: skip
    started = time.perf_counter()
    response = client.post("/generate", json=body)
    lines = response.get_data(as_text=True).splitlines()
    seconds = time.perf_counter() - started
    assert response.status_code == 200, lines[:1]
    return seconds, [json.loads(line)["step"] for line in lines[:-1]]


def main(argv=None) -> None:
    args = parse_args(argv)
    model = build_models_folder(args.workdir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    for what, (median, low, high) in preview_costs(args.size, args.decodes).items():
        print(f"| {what} at {args.size}x{args.size} | {median * 1000:.0f} ms ({low * 1000:.0f}-{high * 1000:.0f}) |")
    imagine_engine = imagine.Engine(imagine.Settings(model=model, models_dir=args.workdir))
    imagine_engine.start()
    try:
        client = imagine.create_app(imagine_engine).test_client()
        generation(client, model, 64, 2, 1)  # loads the model and the decoder
        times, previewed, spent = {0: [], 1: []}, [], []
        time_previews(spent)
        for index in range(args.rounds):
            for stream in (0, 1) if index % 2 == 0 else (1, 0):
                spent.clear()
                seconds, steps = generation(client, model, args.size, args.steps, stream)
                times[stream].append(seconds)
                previewed += [(steps, sum(spent) / seconds)] if stream else []
                print(f"round {index + 1}, stream {stream}: {seconds:.1f} s, previews at {steps}", file=sys.stderr)
    finally:
        imagine_engine.stop()
    step = statistics.median(times[0]) / args.steps
    ratio = statistics.median(times[1]) / statistics.median(times[0])
    print(f"| a step at {args.size}x{args.size} (stream 0 / steps) | {step:.2f} s |")
    spread = ", ".join(f"{one:.1f}/{zero:.1f} s" for one, zero in zip(times[1], times[0], strict=True))
    print(f"| stream 1 / stream 0, {args.steps} steps, TAESD previews | {ratio:.3f} ({spread}) |")
    counts = ", ".join(str(len(steps)) for steps, _ in previewed)
    print(f"| TAESD previews streamed of the {args.steps - 1} due | {counts} |")
    shares = ", ".join(f"{share:.1%}" for _, share in previewed)
    print(f"| the previews' own time, of the stream 1 generation's | {shares} |")


if __name__ == "__main__":
    main()
