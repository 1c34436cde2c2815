"""The server's settings and their defaults; imagine.py reads them from flags and IMAGINE_* variables."""

import dataclasses
from pathlib import Path

from engine.encodings import PROMPT_CACHE

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"  # model configs and tokenizers, shipped
DEMO_MODEL = "demo"
MIN_SIZE, MAX_SIZE = 64, 2048  # pixels, each a multiple of 8 (the VAE downsamples by 8); MAX_SIZE is a setting
MAX_BATCH = 8  # pictures one pipeline call draws: one request's `n`, and several requests drawn together; a setting
STATE_DIR = Path("~/.imagine").expanduser()  # where the server keeps its jobs (imagine.py's default)


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 5000
    device: str = "auto"
    fp_prec: str = "auto"
    model: str = DEMO_MODEL
    models_dir: Path = Path("~/.imagine/models").expanduser()  # one folder, or several joined by os.pathsep
    max_loaded: int = 1
    allow_downloads: bool = False
    compile: str = "auto"  # auto, on or off: torch.compile the UNet (engine/compiling.py)
    offload: str = "none"  # none, model or sequential: diffusers' CPU offload, for GPUs a model does not fit
    max_size: int = MAX_SIZE
    max_queue: int = 8
    max_batch: int = MAX_BATCH
    batch_wait_ms: str = "auto"  # how long a request waits for others to draw with it: auto (engine/batching.py), or ms
    rng: str = "cpu"  # the noise source of a request that names none (see engine/noise.py)
    folder_timeout: int = 10  # seconds a request waits for the models folders to be read before it gets 503
    job_ttl: int = 600  # seconds a finished job (POST /jobs) is kept for its client to collect
    max_jobs: int = 64  # finished jobs kept at once; the oldest finished goes first
    # Where POST /jobs jobs are kept across restarts (engine/job_ledger.py); None keeps them in memory only, as an
    # engine does that no server runs (the CLI drawing on its own, tests). The server's default is STATE_DIR.
    state_dir: Path | None = None
    job_attempts: int = 2  # times a job is started before the server stopping during it fails it
    api_key: str = ""
    cors_origins: tuple = ()
    no_web: bool = False
    no_pull: bool = False
    prompt_cache: int = PROMPT_CACHE  # encoded prompts each loaded model keeps (0: none)
    queue: str = ""  # a Redis URL whose queue this server shares with others (engine/fleet.py); "" for its own
