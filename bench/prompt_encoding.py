#!/usr/bin/env python3
"""What a prompt drawn again saves: each family's text encoders at their released size encoding a prompt the first
time, against the next request with the same texts finding it in the model's encodings, through Imagine's own code
(Engine.encoded for SD, flow.flow_conditioning for the flow families), and what one kept entry holds. Random weights
of the exact architectures (speed does not depend on their values); Qwen3-4B takes about 8 GB in bfloat16.

    python bench/prompt_encoding.py --family sd15 sdxl
    python bench/prompt_encoding.py --family z-image flux2-klein --repeats 2
"""

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import diffusers  # noqa: E402

import imagine  # noqa: E402
from engine.encodings import Encodings  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.files.families import FAMILIES  # noqa: E402
from engine.flow import flow_conditioning  # noqa: E402
from engine.models import LoadedModel  # noqa: E402
from engine.request import GenerationRequest  # noqa: E402
from engine.settings import CONFIGS_DIR  # noqa: E402

NEG = "blurry, low quality"
# About 64 tokens of the kind people write; each round adds a word of its own so that its first encoding misses.
PROMPT = (
    "a lighthouse on a rocky cliff at dawn, waves breaking below, seagulls in a pale orange sky, oil painting in the "
    "style of the old masters, warm light on the white tower, dramatic clouds, fine brush strokes, highly detailed, "
    "calm and quiet mood, round {n}"
)


def random_encoder(model_class, config_dir: Path, dtype: torch.dtype, layers: int | None = None):
    """A text encoder of the released architecture in `config_dir` (`layers` of its layers where given), random
    weights made directly in `dtype` (Qwen3-4B in float32 would take 16 GB)."""
    config = model_class.config_class.from_pretrained(config_dir)
    if layers:
        config.num_hidden_layers = layers
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return model_class(config).eval()
    finally:
        torch.set_default_dtype(default)


def tokenizer(config_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(config_dir, local_files_only=True)


def build(family: str, dtype: torch.dtype, qwen3=None, layers: int | None = None):
    """(the family's pipeline holding only its tokenizers and text encoders, the Qwen3 encoder it holds or None)."""
    configs = CONFIGS_DIR / family.replace("sd15", "sd1")
    if family == "sd15":
        te = random_encoder(transformers.CLIPTextModel, configs / "text_encoder", dtype)
        parts = {"vae": None, "unet": None, "scheduler": None, "safety_checker": None, "feature_extractor": None}
        pipe = diffusers.StableDiffusionPipeline(
            text_encoder=te, tokenizer=tokenizer(configs / "tokenizer"), requires_safety_checker=False, **parts
        )
        return pipe, None
    if family == "sdxl":
        te = random_encoder(transformers.CLIPTextModel, configs / "text_encoder", dtype)
        te2 = random_encoder(transformers.CLIPTextModelWithProjection, configs / "text_encoder_2", dtype)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=None, unet=None, scheduler=None, text_encoder=te, text_encoder_2=te2,
            tokenizer=tokenizer(configs / "tokenizer"), tokenizer_2=tokenizer(configs / "tokenizer_2"),
        )  # fmt: skip
        return pipe, None
    qwen3 = qwen3 or random_encoder(transformers.Qwen3Model, configs / "text_encoder", dtype, layers)
    parts = {"vae": None, "transformer": None, "scheduler": None, "text_encoder": qwen3}
    if family == "z-image":
        return diffusers.ZImagePipeline(tokenizer=tokenizer(configs / "tokenizer"), **parts), qwen3
    return diffusers.Flux2KleinPipeline(tokenizer=tokenizer(configs / "tokenizer"), is_distilled=True, **parts), qwen3


def entry_bytes(entry) -> int:
    """The bytes the tensors of one kept entry hold."""
    if isinstance(entry, torch.Tensor):
        return entry.untyped_storage().nbytes()
    values = entry.values() if isinstance(entry, dict) else entry
    return sum(entry_bytes(value) for value in values if value is not None)


def measure(family: str, pipe, repeats: int, engine: Engine) -> dict:
    """Encodes a new prompt and its negative, then asks for the same texts again (another seed), `repeats` rounds."""
    model = LoadedModel(family, FAMILIES[family.replace("sd15", "sd1")], pipe, None, {}, encodings=Encodings())
    rounds = itertools.count()
    first, again, tokens, size = [], [], 0, 0
    for _ in range(repeats):
        prompt = PROMPT.format(n=next(rounds))
        if model.family.flow:  # Z-Image at guidance 0 (Turbo's default) and klein read the prompt alone
            req = GenerationRequest(prompt=prompt, neg=NEG, guidance=0.0)

            def encode(req=req):
                return flow_conditioning(model, req, model.encodings)
        else:

            def encode(prompt=prompt):
                return engine.encoded(model, prompt, NEG, 1)

        for times in (first, again):
            started = time.perf_counter()
            entry = encode()
            times.append(time.perf_counter() - started)
            print(f"  {family}: {'again' if times is again else 'first'} {times[-1]:.4f} s", file=sys.stderr)
        size = entry_bytes(entry)
        tokens = len(pipe.tokenizer(prompt, add_special_tokens=False).input_ids)
    return {"first": first, "again": again, "tokens": tokens, "entry": size}


def spread(values: list, unit: float = 1.0, digits: int = 2) -> str:
    values = [value * unit for value in values]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", choices=("sd15", "sdxl", "z-image", "flux2-klein"), required=True)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a new prompt and the same again")
    parser.add_argument(
        "--qwen3-layers",
        type=int,
        help="build Qwen3-4B with this many of its 36 layers, where memory is short (8 GB in bfloat16 for all): "
        "the time grows with the layers, so the full encoder takes about 36/N times as long",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    engine = Engine(imagine.Settings(models_dir=Path(tempfile.mkdtemp())))  # for Engine.encoded; it runs nothing
    results, qwen3 = {}, None
    for family in args.family:
        pipe, qwen3 = build(family, dtype, qwen3, args.qwen3_layers)
        with torch.inference_mode():
            results[family] = measure(family, pipe, args.repeats, engine)
    threads = torch.get_num_threads()
    print(f"\nEncoding a prompt (SD: and its negative): {args.dtype}, {threads} threads, {args.repeats} rounds")
    if qwen3 is not None:
        print(f"Qwen3-4B with {qwen3.config.num_hidden_layers} of its 36 layers")
    print("\n| family | prompt tokens | first time, s | again, ms | again ÷ first | one entry |")
    print("|---|---|---|---|---|---|")
    for family, result in results.items():
        ratio = statistics.median(result["again"]) / statistics.median(result["first"])
        print(
            f"| {family} | {result['tokens']} | {spread(result['first'])} | {spread(result['again'], 1000, 3)} "
            f"| {ratio:.2e} | {result['entry'] / 2**20:.2f} MiB |"
        )


if __name__ == "__main__":
    main()
