"""The device a server runs on and the precision it computes in."""

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("imagine")


def pick_device(name: str) -> torch.device:
    """'auto' takes the fastest device present; a named one must exist, `cuda:N` down to its GPU."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    kind, _, index = name.partition(":")
    if not available[kind]:
        raise SystemExit(f"imagine: device {name!r} is not available on this machine")
    if index and int(index) >= (count := torch.cuda.device_count()):
        gpus = f"cuda:0 to cuda:{count - 1}" if count else "none"
        raise SystemExit(f"imagine: device {name!r} is not available: this machine has {count} GPU(s) ({gpus})")
    return torch.device(name)


def device_memory(device: torch.device) -> int:
    """The memory a model has to draw in, in bytes: a GPU's own, else the machine's (MPS shares it with the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_feature() -> str | None:
    """The instructions that run bfloat16 natively on this CPU (avx512_bf16 or AMX), or None if it has neither."""
    try:
        # torch's own probe answers on every operating system.
        found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}
    except AttributeError:  # private helpers a future torch may drop; Linux still lists the flags
        flags = set(CPUINFO.read_text().split()) if CPUINFO.is_file() else set()
        found = {"avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags}
    return next((name for name, present in found.items() if present), None)


def pick_dtype(fp_prec: str, device: torch.device) -> torch.dtype:
    """16-bit means float16 on GPUs; on CPUs float16 is slow or unsupported, so bfloat16.

    'auto' takes 16-bit wherever it is fast: always on a GPU, and on a CPU that runs bfloat16
    natively, about twice as fast as float32 there (docs/performance.md, Figures behind the code).
    """
    if fp_prec == "auto":
        if device.type != "cpu":
            fp_prec, why = "16", f"float16 on {device.type}: half the memory and time of float32"
        elif feature := cpu_bf16_feature():
            fp_prec, why = "16", f"bfloat16: this CPU runs it natively ({feature}), about twice as fast as float32"
        else:
            fp_prec, why = "32", "float32: this CPU has no native bfloat16 (avx512_bf16 or AMX), where 16-bit is slower"
        log.info("precision auto: %s", why)
    if fp_prec == "32":
        return torch.float32
    if device.type == "cpu" and cpu_bf16_feature() is None:
        warn_bfloat16_is_emulated()
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def warn_bfloat16_is_emulated() -> None:
    """An explicit -f 16 is honoured (it halves the memory), but on such a CPU a generation can look like a hang."""
    log.warning(
        "-f 16 on a CPU without native bfloat16 (no avx512_bf16 or AMX): bfloat16 is emulated here, measured over "
        "20x slower than float32 (256x256, 4 steps, SD1.5: over 6 min against 17 s on 2 cores); -f 32 is faster"
    )
