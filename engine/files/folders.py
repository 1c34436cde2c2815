"""The models folders: names a request may use, how they are found, walked and listed."""

import concurrent.futures
import errno
import json
import logging
import os
import queue
import stat
import threading
from pathlib import Path

from engine.errors import ImagineError

log = logging.getLogger("imagine")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".gguf")  # .gguf: FLUX and Z-Image diffusion models (gguf_files.py)
# The most read of a small file beside a model (a config, a sidecar, an SD2 .yaml): theirs are a few KB, and one
# longer is no config but a damaged or hostile file, whose reading must cost little.
SMALL_FILE_BYTES = 64 * 1024


def real_path(path: Path) -> Path | None:
    """Where a path leads once links are followed, or None if nothing is there (or the name cannot be a path)."""
    try:
        return path.resolve() if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # a name too long, a link loop
        return None


def model_folders(models_dir: Path | str) -> list[Path]:
    """The models folders of the setting, in search order: several are joined by os.pathsep, as in PATH."""
    return [Path(part).expanduser().absolute() for part in str(models_dir).split(os.pathsep) if part]


def check_model_name(name: str, field: str = "model") -> None:
    """A name from the network may only walk down the models folders: links inside them are the owner's
    business and are followed, but the name itself may not climb out or smuggle in another path syntax."""
    if "\0" in name:
        raise ImagineError(f"{field} must not contain a NUL byte")
    if "\\" in name:
        raise ImagineError(f"{field} {name!r} must not contain a backslash; separate folders with /")
    if ".." in Path(name).parts:
        raise ImagineError(f"{field} {name!r} must not contain '..'; name a model inside the models folders", 403)


def relative_to_folders(name: str, folders: list[Path]) -> str:
    """A request's name relative to the models folders: an absolute name must lie, as written, inside one."""
    path = Path(name)
    if not path.is_absolute():
        return name
    for folder in folders:
        for root in (folder, real_path(folder)):
            if root is not None and path.is_relative_to(root) and path != root:
                return str(path.relative_to(root))
    raise ImagineError(
        f"model {name!r} is outside the models folders; add its folder to --models-dir (IMAGINE_MODELS_DIR)", 403
    )


def find_in_folders(folders: list[Path], name: str, suffixes: tuple = ()) -> Path | None:
    """The first entry `name` (or `name` plus one of `suffixes`) in the folders, searched in order, links followed.

    Returns the path as found (not resolved), or None. Meant for any kind of file under the models folders:
    checkpoints here, `loras/` or `embeddings/` entries with their own sub-folder prefixed to `name`."""
    for folder in folders:
        entry = folder / name
        for candidate in (entry, *(entry.with_name(entry.name + suffix) for suffix in suffixes)):
            if real_path(candidate) is not None:
                return candidate
    return None


def walk_folders(folders: list[Path], skip: tuple = ()):
    """Every file and folder under the models folders as (name relative to its folder, path), links followed,
    each real folder entered once (a link loop ends there), top-level sub-folders in `skip` left out."""
    entered = set()
    for folder in folders:
        for directory, subdirs, files in os.walk(folder, followlinks=True):
            try:
                real = os.stat(directory)
            except OSError:
                subdirs[:] = []
                continue
            if (real.st_dev, real.st_ino) in entered:
                subdirs[:] = []
                continue
            entered.add((real.st_dev, real.st_ino))
            relative = Path(directory).relative_to(folder)
            if relative == Path():
                subdirs[:] = [d for d in subdirs if d not in skip]
            entries = sorted(subdirs) + sorted(files)
            # A diffusers folder is one model: its parts (unet/, vae/...) are not entries of their own.
            subdirs[:] = sorted(d for d in subdirs if not (Path(directory, d, "model_index.json")).is_file())
            for entry in entries:
                yield (relative / entry).as_posix(), Path(directory) / entry


def is_repo_id(name: str) -> bool:
    """'owner/repo', as the Hugging Face hub names models; never a path."""
    parts = name.split("/")
    return len(parts) == 2 and all(part and part not in (".", "..") and part.strip() == part for part in parts)


# Sub-folders of a models folder that hold other kinds of files: Imagine's, ComfyUI's and AUTOMATIC1111's.
# Imagine's own: what it pulled (.pulled, manifests) and what it is fetching (.pulling, not yet checked).
NOT_CHECKPOINTS = ("loras", "Lora", "LyCORIS", "embeddings", "text_encoders", "clip", "vae", "VAE", "clip_vision",
                   "controlnet", "ControlNet", "upscale_models", "ESRGAN", "RealESRGAN", "SwinIR", "DAT",
                   "hypernetworks", "vae_approx", "VAE-approx", ".pulled", ".pulling")  # fmt: skip

# Sub-folders of a models folder that hold models: ComfyUI's (checkpoints, and diffusion models alone, once named unet)
# and AUTOMATIC1111's (Stable-diffusion). So that `--models-dir ~/ComfyUI/models` works whole.
CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models", "unet", "Stable-diffusion")


def checkpoint_folders(folders: list) -> list:
    """The folders models are looked up in, in order: for each models folder, its model sub-folders that exist, then
    the folder itself; a model in `checkpoints/` is then named without the sub-folder, as ComfyUI names it."""
    return [path for folder in folders for path in (*(folder / sub for sub in CHECKPOINT_FOLDERS), folder)
            if path == folder or path.is_dir()]  # fmt: skip


def is_model_entry(path: Path, real: Path) -> bool:
    """A checkpoint file or a diffusers pipeline folder."""
    if real.is_dir():
        return (real / "model_index.json").is_file()
    return path.suffix in CHECKPOINT_SUFFIXES and real.is_file()  # a FIFO or device is never opened


def read_regular_file(path: Path, limit: int = SMALL_FILE_BYTES) -> bytes:
    """The first `limit` bytes of a small file; anything but a regular file (a FIFO, a device) is an OSError, found
    without waiting: opening a FIFO for reading would wait for a writer forever."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return file.read(limit)


def read_small_json(path: Path):
    """The JSON value of a small file (a config, a sidecar): an OSError as read_regular_file's; a ValueError where it
    is not JSON, longer than SMALL_FILE_BYTES, or nested deeper than the interpreter recurses (RecursionError, after
    at most about a thousand levels of the bounded text)."""
    data = read_regular_file(path, SMALL_FILE_BYTES + 1)
    if len(data) > SMALL_FILE_BYTES:
        raise ValueError(f"longer than {SMALL_FILE_BYTES >> 10} KiB")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deep") from None


FOLDER_WAITERS = 4  # requests that may wait for them at once (each holds a thread of its own; see create_server)


class FolderReader:
    """Reads the models folders (listings, family detection) on a thread of its own, one read at a time, so that a
    file or a network mount that blocks cannot take the threads that answer /health and everything else: a request
    waits `timeout` seconds at most (--folder-timeout), and FOLDER_WAITERS requests at once; more get 503 at once."""

    def __init__(self, timeout: int):
        self.timeout = timeout
        self.reads = queue.Queue()
        self.waiters = threading.BoundedSemaphore(FOLDER_WAITERS)
        threading.Thread(target=self.run, name="imagine-folders", daemon=True).start()

    def run(self) -> None:
        while True:
            future, function = self.reads.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as error:  # handed to the request that asked, which answers it
                    future.set_exception(error)

    def read(self, function):
        """`function()`'s result, computed on the reader's thread."""
        slow = ImagineError("the models folders are slow to read (a stalled disk or network mount?); try again", 503)
        if not self.waiters.acquire(blocking=False):
            slow.retry_after = self.timeout
            raise slow
        try:
            future = concurrent.futures.Future()
            self.reads.put((future, function))
            try:
                return future.result(timeout=self.timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()  # if it has not started: a read stuck before it keeps the reader
                log.warning("reading the models folders took over %d s; answered 503", self.timeout)
                slow.retry_after = self.timeout
                raise slow from None
        finally:
            self.waiters.release()


def model_name(folders: list[Path], relative: str, real: Path) -> str | None:
    """The shortest name that a request can pass to reach this entry: without its suffix where that is unambiguous."""
    short = relative.removesuffix(Path(relative).suffix) if Path(relative).suffix in CHECKPOINT_SUFFIXES else None
    for name in (short, relative):
        found = name and find_in_folders(folders, name, CHECKPOINT_SUFFIXES)
        if found and real_path(found) == real:
            return name
    return None
