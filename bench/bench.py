#!/usr/bin/env python3
"""Imagine against bare diffusers, side by side in one run: prints a markdown table of ratios and targets.

    python bench/bench.py --quick                      # builds a random-weight SD1.5 checkpoint first (2 GB)
    python bench/bench.py --checkpoint sd15.safetensors
    python bench/bench.py --cancel                     # how soon a cancelled generation makes way, 512x512
    python bench/bench.py --quick --batch 4            # a batch: one batched call against one call per picture
    python bench/bench.py --quick --progress           # what polling /sdapi/v1/progress twice a second costs
    python bench/bench.py --quick --repeat-prompt      # a prompt drawn again (another seed) against a new one
    python bench/bench.py --concurrent --steps 4       # 4 concurrent clients (one batch) against 4 sequential requests
    python bench/bench.py --device cuda --batch 4      # on a GPU, in float16
    python bench/bench.py --quick --compile            # --compile on against off and bare diffusers; its first waits

The model has the exact SD1.5 architecture (speed does not depend on the weight values). Imagine runs
as in production: `imagine.py` in its own process, generations on its main thread, requests over HTTP.
The bare diffusers call runs here, on this process's main thread, with the same checkpoint, configs,
sampler and parameters. Every timing is taken warm, in rounds that alternate the contestants so that
a busy machine slows them alike; the table gives medians with the spread (min-max) of the runs.
"""

import argparse
import base64
import gc
import http.client
import io
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ldm_checkpoint import ldm_state_dict, random_sd15_modules  # noqa: E402
from lora_files import kohya_lora  # noqa: E402

import imagine  # noqa: E402
from engine.devices import cpu_bf16_feature, pick_dtype  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.loras import use_loras  # noqa: E402
from engine.models import Models  # noqa: E402
from engine.prompts import prompt_embeddings  # noqa: E402
from engine.settings import CONFIGS_DIR  # noqa: E402

PROMPT, NEG, SEED = "a lighthouse on a cliff at dawn, oil painting", "blurry", 1234
# About 300 tokens of the kind copied from model pages: weights, brackets, commas.
LONG_PROMPT = ", ".join(
    f"(masterpiece:1.2), best quality, a lighthouse {n} on a [rocky] cliff, ((dramatic sky)), oil painting"
    for n in range(12)
)
SD15_CONFIG = CONFIGS_DIR / "sd1"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an SD1.5 single-file checkpoint; default: build one")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imagine-bench"), help="where a built one goes")
    parser.add_argument("--quick", action="store_true", help="256x256, 8 steps, 5 runs each: about 5 min on 2 cores")
    parser.add_argument("--size", type=int, default=512, help="width and height (default 512)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per generation (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each contestant (default 5)")
    parser.add_argument(
        "--cancel", action="store_true", help="only measure the time from a client leaving to the next request starting"
    )
    parser.add_argument(
        "--progress", action="store_true", help="only a generation with and without /sdapi/v1/progress polled at 2 Hz"
    )
    parser.add_argument("--batch", type=int, metavar="N", help="only compare N pictures in one call and one by one")
    parser.add_argument(
        "--repeat-prompt",
        action="store_true",
        help="only a request whose prompt was drawn before (another seed) against one with a new prompt",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="only --compile on against --compile off and bare diffusers, and what compiling makes a first picture "
        "wait on a first start and after a restart",
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="only 4 clients at once (drawn as one batch) against 4 requests one after another",
    )
    parser.add_argument("--device", default="cpu", help="where both run: cpu (default), cuda, mps; GPUs in float16")
    parser.add_argument(
        "--loras-only",
        action="store_true",
        help="only the LoRA, long-prompt and lcm rows (a shorter run on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.repeats = 256, 8, 5
    return args


# ---- the model


def build_checkpoint(path: Path) -> Path:
    """Writes a random-weight SD1.5-architecture checkpoint in the original LDM layout, fp16, as most downloads are."""
    print(f"building a random SD1.5-architecture checkpoint at {path} ...", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = ldm_state_dict(random_sd15_modules(SD15_CONFIG), dtype=torch.float16)
    save_file(state, str(path))
    return path


def bare_pipeline(checkpoint: Path, dtype: torch.dtype, device: str = "cpu"):
    """What a diffusers user writes: from_single_file with a local config, the same sampler as Imagine's default."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(SD15_CONFIG), local_files_only=True, torch_dtype=dtype
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def bare_generate(pipe, size: int, steps: int) -> Image.Image:
    return batched_generate(pipe, size, steps, 1)[0]


# ---- Imagine, as a server in its own process


class Server:
    """`imagine.py` started as a user starts it, on a free port; keeps its log."""

    def __init__(self, checkpoint: Path, fp_prec: str, device: str = "cpu", *flags: str, env: dict = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, str(ROOT / "imagine.py"), "--model", checkpoint.stem, "-d", device]
        # Uncompiled unless the flags say otherwise: compiling would cost minutes in every row that does not measure it.
        command += [
            "--models-dir",
            str(checkpoint.parent),
            "-f",
            fp_prec,
            "--port",
            str(port),
            "--compile",
            "off",
            *flags,
        ]
        # Each its own state folder: the benchmark runs servers side by side, and one folder has one server.
        self.state = tempfile.TemporaryDirectory(prefix="imagine-bench-state-")
        command += ["--state-dir", self.state.name]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{port}/generate"
        self.log = []
        self.log_times = []  # when each line of self.log arrived (time.perf_counter)
        for line in self.process.stderr:
            self.log_times.append(time.perf_counter())
            self.log.append(line)
            if "listening on" in line:
                break
        else:
            raise SystemExit("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=self.keep_log, daemon=True).start()

    def keep_log(self) -> None:
        for line in self.process.stderr:
            self.log_times.append(time.perf_counter())
            self.log.append(line)

    def generate(self, size: int, steps: int, **fields) -> list:
        """Posts one request and reads the whole answer; returns its JSON objects (one, or one per streamed line)."""
        body = {"prompt": PROMPT, "neg": NEG, "width": size, "height": size, "num_steps": steps, "seed": SEED}
        data = json.dumps({**body, **fields}).encode()
        request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            return [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]

    def stream_then_leave(self, size: int, steps: int, leave_after: float) -> tuple:
        """Streams a generation, leaves `leave_after` of a step after the first preview, and posts the next request
        at once; returns the seconds of a step and those from leaving to the next request starting."""
        host, port = self.url.removeprefix("http://").split("/")[0].split(":")
        body = {"prompt": PROMPT, "neg": NEG, "width": size, "height": size, "num_steps": steps, "stream": 1}
        connection = http.client.HTTPConnection(host, int(port), timeout=3600)
        connection.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.readline()
        first = time.perf_counter()
        response.readline()
        step = time.perf_counter() - first
        time.sleep(leave_after * step)
        lines = len(self.log)
        left = time.perf_counter()
        response.close()
        connection.close()
        after = threading.Thread(target=self.generate, args=(size, 1))
        after.start()
        while not (starting := [i for i in range(lines, len(self.log)) if "generating" in self.log[i]]):
            time.sleep(0.005)
        starts = self.log_times[starting[0]]
        after.join()
        return step, starts - left

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def load_seconds(self) -> list:
        return [float(m.group(1)) for line in self.log if (m := re.search(r"loaded .* in ([\d.]+) s", line))]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.state.cleanup()


# ---- measuring


def timed(call) -> float:
    gc.collect()  # what the previous run left behind is not this run's cost
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def rounds(contestants: dict, repeats: int) -> dict:
    """Runs each contestant once per round, the order rotated each round; returns name -> seconds per run."""
    names, times = list(contestants), {name: [] for name in contestants}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(contestants[name]))
            print(f"  round {r + 1}/{repeats}: {name} {times[name][-1]:.2f} s", file=sys.stderr)
    return times


def spread(values) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


MET = {True: "yes", False: "NO", None: "-"}  # None: a ratio reported without a target


def ratio_row(what, imagine_times, base_times, target) -> tuple:
    """A row of the table; with target None the ratio is reported without a target (met: None)."""
    ratio = statistics.median(imagine_times) / statistics.median(base_times)
    if target is None:
        return what, spread(imagine_times), spread(base_times), f"{ratio:.3f}", "none", None
    return what, spread(imagine_times), spread(base_times), f"{ratio:.3f}", f"<= {target}", ratio <= target


def measure_loads(checkpoint: Path, dtype: torch.dtype, device: str, repeats: int) -> tuple:
    """Imagine's loader (family check, load, cast, img2img) against from_single_file, alternating, in this process."""
    settings = imagine.Settings(models_dir=checkpoint.parent)
    key = str(checkpoint.resolve())

    def imagine_load():
        Models(settings, torch.device(device), dtype).get(key)

    def diffusers_load():
        bare_pipeline(checkpoint, dtype, device)

    diffusers_load()  # the first read of the file fills the page cache: both then read it from memory
    times = rounds({"imagine load": imagine_load, "diffusers load": diffusers_load}, repeats)
    return times["imagine load"], times["diffusers load"]


def measure_cancel(checkpoint: Path, device: str, size: int, steps: int, repeats: int) -> None:
    """Prints how soon a generation whose client left makes way for the next request: the client leaves at a
    point spread evenly across a step, and the time runs until the server logs the next request generating."""
    server = Server(checkpoint, "16", device)
    try:
        server.generate(size, 1)  # loads the model
        results = [server.stream_then_leave(size, steps, (r + 0.5) / repeats) for r in range(repeats)]
    finally:
        server.stop()
    steps_seconds, waits = [step for step, _ in results], [wait for _, wait in results]
    for r, (step, wait) in enumerate(results):
        print(f"  left {(r + 0.5) / repeats:.0%} into a step of {step:.2f} s: next started {wait:.2f} s later")
    print(f"\ncancel at {size}x{size}: the next request starts {spread(waits)} after the client leaves;")
    print(f"a step takes {spread(steps_seconds)} ({repeats} runs)")


def poll_progress(url: str, stop: threading.Event, polls: list) -> None:
    """GET /sdapi/v1/progress twice a second, with its preview, as SillyTavern and A1111's own page poll."""
    while not stop.wait(0.5):
        with urllib.request.urlopen(f"{url}/sdapi/v1/progress", timeout=60) as response:
            polls.append(json.loads(response.read())["current_image"] is not None)


def measure_progress(checkpoint: Path, fp_prec: str, device: str, size: int, steps: int, repeats: int) -> tuple:
    """The same generation with and without a client polling /sdapi/v1/progress at 2 Hz, in alternating rounds."""
    server = Server(checkpoint, fp_prec, device)
    base = server.url.removesuffix("/generate")
    polls = []

    def polled():
        stop = threading.Event()
        poller = threading.Thread(target=poll_progress, args=(base, stop, polls))
        poller.start()
        try:
            server.generate(size, steps)
        finally:
            stop.set()
            poller.join()

    try:
        server.generate(size, steps)  # loads the model
        times = rounds({"progress polled": polled, "not polled": lambda: server.generate(size, steps)}, repeats)
    finally:
        server.stop()
    print(f"  {len(polls)} polls, {sum(polls)} with a preview", file=sys.stderr)
    return times["progress polled"], times["not polled"]


def measure_repeat_prompt(checkpoint: Path, fp_prec: str, device: str, size: int, steps: int, repeats: int) -> list:
    """The same request with a new seed, its prompt found encoded (engine/encodings.py), against one with a prompt
    not drawn before, in alternating rounds through the server; and, in process, encoding a prompt and its negative
    the first time against finding them."""
    fresh, seeds = itertools.count(), itertools.count(SEED + 1)
    server = Server(checkpoint, fp_prec, device)
    try:
        server.generate(size, steps)  # loads the model and keeps PROMPT
        times = rounds(
            {
                "new prompt": lambda: server.generate(size, steps, prompt=f"{PROMPT}, take {next(fresh)}"),
                "prompt again": lambda: server.generate(size, steps, seed=next(seeds)),
            },
            repeats,
        )
    finally:
        server.stop()
    gc.collect()
    engine = Engine(imagine.Settings(models_dir=checkpoint.parent, fp_prec=fp_prec, device=device))
    model = engine.models.get(str(checkpoint.resolve()))
    first, again = [], []
    for _ in range(repeats):
        prompt = f"{PROMPT}, take {next(fresh)}"
        first.append(timed(lambda prompt=prompt: engine.encoded(model, prompt, NEG, 1)))
        again.append(timed(lambda prompt=prompt: engine.encoded(model, prompt, NEG, 1)))
    return [
        ratio_row("request with a prompt drawn before (new seed) ÷ with a new prompt", times["prompt again"],
                  times["new prompt"], None),
        ratio_row("encoding a prompt drawn before ÷ a new one (in process)", again, first, 0.01),
    ]  # fmt: skip


def batched_generate(pipe, size: int, steps: int, n: int) -> list:
    """One pipeline call for n pictures, each with its own generator (seeds SEED, SEED+1, ...)."""
    generators = [torch.Generator("cpu").manual_seed(SEED + k) for k in range(n)]
    with torch.inference_mode():
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEG,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            num_images_per_prompt=n,
            generator=generators,
        ).images


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


def compare_batch(checkpoint: Path, fp_prec: str, device: str, size: int, steps: int, n: int, repeats: int) -> None:
    """How a batch should run on this machine: one batched call, or the pictures one after another; and how
    Imagine runs it (`n` on /generate), with each of its pictures against the single request with that seed."""
    dtype = pick_dtype(fp_prec, torch.device(device))
    pipe = bare_pipeline(checkpoint, dtype, device)
    server = Server(checkpoint, fp_prec, device)
    try:
        bare_generate(pipe, size, steps)  # warm-up
        batch = server.generate(size, steps, n=n)[-1]
        times = rounds(
            {
                f"bare diffusers, one call for {n}": lambda: batched_generate(pipe, size, steps, n),
                f"bare diffusers, {n} calls one by one": lambda: [bare_generate(pipe, size, steps) for _ in range(n)],
                f"Imagine, /generate with n {n}": lambda: server.generate(size, steps, n=n),
            },
            repeats,
        )
        singles = [server.generate(size, steps, seed=seed)[-1]["img"] for seed in batch["seeds"]]
    finally:
        server.stop()
    differences = [int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(batch["images"], singles, strict=True)]
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"\n{n} pictures, SD1.5 architecture, {size}x{size}, {steps} steps, {dtype}, {device}{threads}")
    print("\n| how | time (median, min-max) |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {spread(values)} |")
    print(f"\nImagine's pictures against the single requests with their seeds: largest pixel difference {differences}")


CLIENTS = 4  # concurrent clients in --concurrent
# Batching on whatever the picture's size (the wait is long enough for 4 clients' requests to arrive on a busy
# machine), against batching off for the requests one after another, which then lose no wait.
BATCHING, NOT_BATCHING = ("--batch-wait-ms", "500"), ("--batch-wait-ms", "0")


def concurrent_clients(server, size: int, steps: int) -> list:
    """CLIENTS clients post at once, each its own prompt and seed; returns their answers' last objects."""
    answers = [None] * CLIENTS

    def client(index):
        answers[index] = server.generate(size, steps, prompt=f"{PROMPT}, {index}", seed=SEED + 10 * index)[-1]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def sequential_requests(server, size: int, steps: int) -> list:
    """The same CLIENTS requests, one after another."""
    return [
        server.generate(size, steps, prompt=f"{PROMPT}, {index}", seed=SEED + 10 * index)[-1]
        for index in range(CLIENTS)
    ]


def measure_concurrent(checkpoint: Path, fp_prec: str, device: str, size: int, steps: int, repeats: int) -> tuple:
    """CLIENTS concurrent clients on a server that batches them against the same requests one after another on one
    that does not, in alternating rounds; returns (the two lists of seconds, the batched calls' sizes its log told,
    the largest pixel difference between a client's picture batched and drawn alone)."""
    batching, alone = Server(checkpoint, fp_prec, device, *BATCHING), Server(checkpoint, fp_prec, device, *NOT_BATCHING)
    try:
        for server in (batching, alone):
            server.generate(size, steps)  # loads the model
        together = concurrent_clients(batching, size, steps)
        one_by_one = sequential_requests(alone, size, steps)
        times = rounds(
            {
                f"{CLIENTS} concurrent clients": lambda: concurrent_clients(batching, size, steps),
                f"{CLIENTS} sequential requests": lambda: sequential_requests(alone, size, steps),
            },
            repeats,
        )
    finally:
        for server in (batching, alone):
            server.stop()
    batches = [int(m.group(1)) for line in batching.log if (m := re.search(r"drawing (\d+) requests as one", line))]
    pairs = zip(together, one_by_one, strict=True)
    difference = max(int(np.abs(pixels(a["img"]) - pixels(b["img"])).max()) for a, b in pairs)
    return times[f"{CLIENTS} concurrent clients"], times[f"{CLIENTS} sequential requests"], batches, difference


def build_loras(checkpoint: Path, pipe) -> list:
    """Two random rank-32 LoRAs on every attention and MLP layer of the UNet and the text encoder, in kohya's
    layout, in the `loras` folder beside the checkpoint (the server's models directory)."""
    from safetensors.torch import save_file

    folder = checkpoint.parent / "loras"
    folder.mkdir(exist_ok=True)
    names = ["bench_a", "bench_b"]
    for seed, name in enumerate(names):
        if not (folder / f"{name}.safetensors").is_file():
            save_file(kohya_lora(pipe, seed=seed, rank=32, scale=0.01), str(folder / f"{name}.safetensors"))
    return names


def measure_in_process(checkpoint: Path, dtype: torch.dtype, device: str, repeats: int) -> tuple:
    """Builds the LoRAs from the loaded model's layers, then measures (seconds to switch between the two
    loaded LoRAs, seconds to encode LONG_PROMPT and its negative, LONG_PROMPT's tokens, the LoRA names)."""
    settings = imagine.Settings(models_dir=checkpoint.parent)
    models = Models(settings, torch.device(device), dtype)
    model = models.get(str(checkpoint.resolve()))
    loras = build_loras(checkpoint, model.txt2img)
    for name in loras:
        use_loras(settings, model, [(name, 0.8)])
    switches, encodings = [], []
    for _ in range(repeats):
        for name in loras:
            switches.append(timed(lambda name=name: use_loras(settings, model, [(name, 0.8)])))
        with torch.inference_mode():
            encodings.append(timed(lambda: prompt_embeddings(model.txt2img, LONG_PROMPT, NEG, 1, {})))
    tokens = len(model.txt2img.tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids)
    return switches, encodings, tokens, loras


def lora_rows(checkpoint: Path, dtype: torch.dtype, device: str, size: int, steps: int, repeats: int) -> list:
    """LoRA requests against plain ones, LoRA switching, the encoding of a long weighted prompt, and lcm's
    guidance 1 (no unconditional half) against 2, on the `-f 16` server."""
    print("loras, prompts, lcm:", file=sys.stderr)
    switches, encodings, tokens, loras = measure_in_process(checkpoint, dtype, device, repeats)
    gc.collect()
    server = Server(checkpoint, "16", device)
    try:
        for name in loras:
            server.generate(size, steps, loras=[{"name": name, "weight": 0.8}])
        times = rounds(
            {
                "no lora": lambda: server.generate(size, steps),
                "cached lora": lambda: server.generate(size, steps, loras=[{"name": loras[0], "weight": 0.8}]),
                "lcm, guidance 1": lambda: server.generate(size, steps, sampler="lcm", guidance=1.0),
                "lcm, guidance 2": lambda: server.generate(size, steps, sampler="lcm", guidance=2.0),
            },
            repeats,
        )
        lora_loads = sum("loaded lora" in line for line in server.log)
        long_generation = timed(lambda: server.generate(size, 25, prompt=LONG_PROMPT))
    finally:
        server.stop()
    encoding_share = statistics.median(encodings) / long_generation
    return [
        ratio_row("request with a cached rank-32 LoRA ÷ without", times["cached lora"], times["no lora"], 1.1),
        (
            "second request with the same LoRA: loads",
            f"{lora_loads} loads for 2 LoRAs in {2 + repeats} requests using them",
            "",
            "",
            "1 per LoRA",
            lora_loads == 2,
        ),
        (
            "switching between two loaded LoRAs (in process)",
            spread(switches),
            "",
            "",
            "<= 0.5 s",
            statistics.median(switches) <= 0.5,
        ),
        (
            f"encoding a {tokens}-token weighted prompt ÷ a 25-step generation with it",
            spread(encodings),
            f"{long_generation:.2f} s",
            f"{encoding_share:.3f}",
            "<= 0.03",
            encoding_share <= 0.03,
        ),
        # Guidance 2 runs the UNet on 2 latents a step, guidance 1 on 1; on a CPU 2 cost about 1.8 times 1 (see
        # --batch), and decoding and encoding cost the same in both: about 0.6-0.7 with the skip, 1 without.
        ratio_row("lcm: guidance 1 ÷ guidance 2", times["lcm, guidance 1"], times["lcm, guidance 2"], 0.75),
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    checkpoint = args.checkpoint or args.workdir / "sd15-random.safetensors"
    if not checkpoint.is_file():
        if args.checkpoint:
            raise SystemExit(f"bench: no checkpoint at {checkpoint}")
        build_checkpoint(checkpoint)
    device = args.device
    bf16_feature = cpu_bf16_feature() if device == "cpu" else "a GPU's float16"
    # Imagine is compared with diffusers in the precision -f auto takes on this CPU: bfloat16 where it is
    # native, else float32 (on a GPU: float16). The other precision runs beside it, so that `-f 16 ÷ -f 32` says
    # what 16-bit costs or saves on whatever CPU this is; only native 16-bit has a target (else it is emulated).
    ours = "16" if bf16_feature else "32"
    dtype = pick_dtype(ours, torch.device(device))
    size, steps, repeats = args.size, args.steps, args.repeats
    if args.cancel:
        measure_cancel(checkpoint, device, size, steps, repeats)
        return
    print(f"{size}x{size}, {steps} steps, {repeats} runs each on {device}; 16-bit: {bf16_feature}", file=sys.stderr)
    if args.progress:
        polled, plain = measure_progress(checkpoint, ours, device, size, steps, repeats)
        row = ratio_row("generation with /sdapi/v1/progress polled at 2 Hz ÷ without", polled, plain, 1.02)
        print_table([row], device, size, steps, repeats, bf16_feature)
        return
    if args.batch:
        compare_batch(checkpoint, ours, device, size, steps, args.batch, repeats)
        return
    if args.repeat_prompt:
        rows = measure_repeat_prompt(checkpoint, ours, device, size, steps, repeats)
        print_table(rows, device, size, steps, repeats, bf16_feature)
        return
    if args.compile:
        rows = compile_rows(checkpoint, args.workdir, ours, dtype, device, size, steps, repeats, bf16_feature)
        print_table(rows, device, size, steps, repeats, bf16_feature)
        return
    if args.concurrent:
        together, one_by_one, batches, difference = measure_concurrent(checkpoint, ours, device, size, steps, repeats)
        what = f"{CLIENTS} concurrent clients (one batch) ÷ {CLIENTS} sequential requests"
        print_table([ratio_row(what, together, one_by_one, None)], device, size, steps, repeats, bf16_feature)
        print(f"\nrequests per batched call, as the server logged them: {batches}")
        print(f"largest pixel difference, each client's picture batched against drawn alone: {difference}")
        return
    rows = [] if args.loras_only else server_rows(checkpoint, ours, dtype, device, size, steps, repeats, bf16_feature)
    rows += lora_rows(checkpoint, dtype, device, size, steps, repeats)
    print_table(rows, device, size, steps, repeats, bf16_feature)


def server_rows(checkpoint, ours: str, dtype, device: str, size: int, steps: int, repeats: int, bf16_feature) -> list:
    """Imagine's server against a bare diffusers call: cold loads, generations in both precisions, with and without a
    stream, loads of a loaded model, and what img2img adds to the memory."""
    other = "32" if ours == "16" else "16"
    bare = f"bare diffusers ({str(dtype).removeprefix('torch.')})"
    print("cold loads:", file=sys.stderr)
    imagine_loads, diffusers_loads = measure_loads(checkpoint, dtype, device, repeats)
    pipe = bare_pipeline(checkpoint, dtype, device)
    servers = {"16": Server(checkpoint, "16", device), "32": Server(checkpoint, "32", device)}
    try:
        print("warm-up:", file=sys.stderr)
        bare_generate(pipe, size, steps)
        for server in servers.values():
            server.generate(size, steps)
        contestants = {
            bare: lambda: bare_generate(pipe, size, steps),
            f"/generate -f {ours}": lambda: servers[ours].generate(size, steps),
            f"/generate -f {ours}, stream 1": lambda: servers[ours].generate(size, steps, stream=1),
            f"/generate -f {other}": lambda: servers[other].generate(size, steps),
        }
        print("generations:", file=sys.stderr)
        times = rounds(contestants, repeats)
        rss_txt2img, rss_added, loads = img2img_memory_and_loads(servers[ours], size, steps)
    finally:
        for server in servers.values():
            server.stop()
    requests = 3 + 3 * repeats
    return [
        ratio_row("cold load of the single file ÷ diffusers from_single_file", imagine_loads, diffusers_loads, 1.1),
        ratio_row("/generate end to end ÷ bare diffusers call", times[f"/generate -f {ours}"], times[bare], 1.02),
        ratio_row(
            "stream: 1 ÷ stream: 0", times[f"/generate -f {ours}, stream 1"], times[f"/generate -f {ours}"], 1.03
        ),
        ratio_row("-f 16 ÷ -f 32", times["/generate -f 16"], times["/generate -f 32"], 0.6 if bf16_feature else None),
        (
            "second request for a loaded model: time loading",
            f"{sum(loads[1:]):.2f} s ({len(loads)} load in {requests} requests)",
            *("", "", "0", len(loads) == 1),
        ),
        (
            "resident memory added by img2img after txt2img",
            f"{rss_added * 100:+.1f} % of {rss_txt2img / 2**30:.2f} GiB",
            *("", "", "<= 5 %", rss_added <= 0.05),
        ),
    ]


def compile_rows(checkpoint, workdir, ours, dtype, device, size, steps, repeats, bf16_feature) -> list:
    """--compile on against off and a bare diffusers call, interleaved; and the compiling a first picture waits for,
    on a first start (an empty cache folder) and on a second start with the first's cache (two processes in turn)."""
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(workdir / f"compiled-{time.time():.0f}")}
    bare = f"bare diffusers ({str(dtype).removeprefix('torch.')})"
    pipe = bare_pipeline(checkpoint, dtype, device)
    servers = {"off": Server(checkpoint, ours, device)}
    try:
        print("first pictures (compiling):", file=sys.stderr)
        firsts = {"off": timed(lambda: servers["off"].generate(size, steps))}
        for start in ("first start", "second start"):
            servers["on"] = Server(checkpoint, ours, device, "--compile", "on", env=cache)
            firsts[start] = timed(lambda: servers["on"].generate(size, steps))
            print(f"  {start}: {firsts[start]:.1f} s; --compile off: {firsts['off']:.1f} s", file=sys.stderr)
            if start == "first start":
                servers.pop("on").stop()
        bare_generate(pipe, size, steps)
        contestants = {
            bare: lambda: bare_generate(pipe, size, steps),
            "--compile on": lambda: servers["on"].generate(size, steps),
            "--compile off": lambda: servers["off"].generate(size, steps),
        }
        print("generations:", file=sys.stderr)
        times = rounds(contestants, repeats)
    finally:
        for server in servers.values():
            server.stop()
    warm = statistics.median(times["--compile on"])
    target = 0.77 if bf16_feature else None  # issue 36's target is for CPUs with native bfloat16
    compiling = {start: firsts[start] - warm for start in ("first start", "second start")}
    return [
        ratio_row("/generate --compile on ÷ bare diffusers call", times["--compile on"], times[bare], target),
        ratio_row("/generate --compile on ÷ --compile off", times["--compile on"], times["--compile off"], None),
        (
            "first picture's compiling after a restart ÷ on a first start",
            f"{compiling['second start']:.1f} s",
            f"{compiling['first start']:.1f} s",
            f"{compiling['second start'] / compiling['first start']:.3f}",
            "<= 0.2",
            compiling["second start"] <= 0.2 * compiling["first start"],
        ),
    ]


def img2img_memory_and_loads(server, size: int, steps: int) -> tuple:
    """(resident bytes after a txt2img, what an img2img of its picture adds to them, as a share; the server's load
    times, one per "loaded ... in N s" line of its log)."""
    rss_txt2img = server.rss_bytes()
    answer = server.generate(size, steps)[-1]["img"]
    server.generate(size, steps, img=answer, strength=0.8)
    return rss_txt2img, server.rss_bytes() / rss_txt2img - 1, server.load_seconds()


def print_table(rows: list, device: str, size: int, steps: int, repeats: int, bf16_feature) -> None:
    print()
    print(f"Imagine vs bare diffusers: SD1.5 architecture, {size}x{size}, {steps} steps (dpm++ 2m), CFG 7, on {device}")
    cpu = f"{torch.get_num_threads()} threads, native bf16: {bf16_feature or 'none, so Imagine runs -f 32'}"
    print(f"({cpu if device == 'cpu' else bf16_feature}); times are the median (min-max) of {repeats} warm runs.")
    print()
    print("| what | Imagine | baseline | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for what, measured, baseline, ratio, target, met in rows:
        print(f"| {what} | {measured} | {baseline} | {ratio} | {target} | {MET[met]} |")


if __name__ == "__main__":
    main()
