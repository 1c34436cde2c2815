"""Pulling a model by name, as Ollama did, and removing one. A pull takes the catalog's files of the variant this
machine takes (engine/files/library.py), asks the hub for each (sizes before the first byte, the space checked), and
fetches each missing one beside the models folder, resumably, checks its sha256 and moves it into place; a file two
models use is fetched once and kept once. Its manifest (engine/files/pulled.py) then makes the model draw by its name.
A pull is told as status lines (dicts, as Ollama's /api/pull streamed them): "pulling", "downloading" a few times a
second, "verifying sha256", "success"; a failure is an ImagineError naming the file and what to do."""

import hashlib
import re
import shutil
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

from engine.errors import ImagineError
from engine.files.downloads import (
    HubFile,
    fetch_hub_file,
    fetch_url,
    file_sha256,
    hub_file,
    url_for_messages,
    url_size,
)
from engine.files.folders import model_folders
from engine.files.library import Library, RemoteFile, gigabytes
from engine.files.placing import folder_for
from engine.files.pulled import STAGING, Manifest, check_pull_name, read_manifests, remove_manifest, write_manifest
from engine.settings import Settings

PROGRESS_SECONDS = 0.25  # at most four progress lines a second, however fast the bytes come
SPACE_MARGIN = 2**30  # free space a pull leaves on the disk beyond what it fetches
# A hub file named by its URL or as hf.co/OWNER/REPO/PATH: (repo, revision or None, path).
HUB_URL = re.compile(r"(?:https?://)?(?:hf\.co|huggingface\.co)/([\w.-]+/[\w.-]+)/(?:(?:resolve|blob)/([^/]+)/)?(.+)")


class Stopped(Exception):
    """The pull's reader left: the fetch stops at its next chunk, keeping what came for the next pull."""


class Puller:
    """Pulls into the first models folder, and removes what was pulled; one fetch of a file at a time."""

    def __init__(self, settings: Settings, library: Library | None = None):
        self.settings = settings
        self.library = library or Library()
        self.fetching = {}  # a file's destination -> the lock its one fetch holds
        self.guard = threading.Lock()

    @property
    def folders(self) -> list:
        return model_folders(self.settings.models_dir)

    def pull(self, name: str, memory: int) -> Iterator[dict]:
        """Pulls the catalog's model `name` (or `name:variant`) for a device of `memory` bytes, or the file a URL
        names (pull_url), as status lines."""
        if name.startswith(("http://", "https://", "hf.co/", "huggingface.co/")):
            yield from self.pull_url(name)
            return
        variant, why = self.library.variant(name, memory)
        base = name.partition(":")[0]
        # 1. Ask the hub for each file: what is here already, and whether the rest fits on the disk.
        found = {remote.id: hub_file(remote) for remote in variant.files}
        present = {remote.id: self.present(remote, found[remote.id]) for remote in variant.files}
        missing = [remote for remote in variant.files if present[remote.id] is None]
        total = sum(found[remote.id].size for remote in missing)
        files = [{"file": remote.destination, "size": found[remote.id].size, "present": present[remote.id] is not None}
                 for remote in variant.files]  # fmt: skip
        self.check_space(sum(found[remote.id].size - self.part_size(self.part(remote)) for remote in missing))
        yield {"status": f"pulling {variant.label}", "model": base, "reason": why, "total": total, "files": files}
        # 2. Fetch, check and place each missing file.
        for remote in missing:
            yield from self.fetched(remote, found[remote.id])
        # 3. The model draws by its name from now on.
        ours = {entry["file"] for manifest in read_manifests(self.folders).values() for entry in manifest.files
                if entry["ours"]} | {remote.destination for remote in missing}  # fmt: skip
        entries = [self.manifest_entry(each, found[each.id], each.destination in ours) for each in variant.files]
        write_manifest(Manifest(base, self.folders[0], variant.files[0].destination, tuple(entries), variant.label))
        yield {"status": "success", "model": base}

    def present(self, remote: RemoteFile, found: HubFile) -> Path | None:
        """Where `remote` is in the models folders already, or None; a file of its name and another size is not
        replaced (it may be the user's own), but refused, saying so."""
        for folder in self.folders:
            path = folder / remote.destination
            if path.is_file():
                if path.stat().st_size != found.size:
                    raise ImagineError(
                        f"{remote.destination} is in a models folder already, but not the one the hub has "
                        f"({path.stat().st_size} bytes, the hub's {found.size}): move it away, then pull again",
                        409,
                    )
                return path
        return None

    def check_space(self, needed: int) -> None:
        """Refuses, before the first byte, a pull the disk cannot hold: `needed` bytes more than what came already."""
        folder = self.folders[0]
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if needed + SPACE_MARGIN > free:
            raise ImagineError(
                f"the pull needs {gigabytes(needed)} and the models folder's disk has {gigabytes(free)} free (and "
                f"keeps {gigabytes(SPACE_MARGIN)}): free space there, or choose a smaller variant (GET /catalog)",
                507,
            )

    def part(self, remote: RemoteFile) -> Path:
        """Where `remote` is fetched to: beside the models folder, out of the listing's sight until checked."""
        return self.folders[0] / STAGING / f"{remote.destination}.part"

    @staticmethod
    def part_size(part: Path) -> int:
        return part.stat().st_size if part.is_file() else 0

    def lock_for(self, key: str) -> threading.Lock:
        """The lock the one fetch of a file holds: two pulls that need it fetch it once."""
        with self.guard:
            return self.fetching.setdefault(key, threading.Lock())

    def fetched(self, remote: RemoteFile, found: HubFile) -> Iterator[dict]:
        """Fetches one file (waiting where another pull fetches it already), checks it and moves it into place."""
        lock = self.lock_for(remote.destination)
        while not lock.acquire(timeout=1):
            yield {"status": "waiting for another pull", "file": remote.destination}
        try:
            if self.present(remote, found) is None:  # else the other pull brought it
                part = self.part(remote)
                yield from self.downloaded(remote, found, part, remote.destination)
                destination = self.folders[0] / remote.destination
                destination.parent.mkdir(parents=True, exist_ok=True)
                part.replace(destination)
        finally:
            lock.release()

    def downloaded(self, remote: RemoteFile, found: HubFile, part: Path, shown: str) -> Iterator[dict]:
        """Fetches the rest of a hub file into `part` and checks its size and sha256; lines name it `shown`."""
        part.parent.mkdir(parents=True, exist_ok=True)
        line = {"status": "downloading", "file": shown, "total": found.size}
        yield from reported(lambda report: fetch_hub_file(remote, found, part, report), line, self.part_size(part))
        if part.stat().st_size != found.size:
            raise ImagineError(f"{shown} came to {part.stat().st_size} of {found.size} bytes; pull again", 502)
        if found.sha256 is not None:
            line = {"status": "verifying sha256", "file": shown, "total": found.size}
            sha256 = yield from reported(lambda report: file_sha256(part, report), line)
            if sha256 != found.sha256:
                part.unlink()
                raise ImagineError(
                    f"{shown} came damaged: its sha256 is {sha256}, the hub's {found.sha256}; it is deleted: pull "
                    "again",
                    502,
                )

    def pull_url(self, url: str) -> Iterator[dict]:
        """A file named by its URL (any http(s) URL, a hub URL, or hf.co/OWNER/REPO/PATH): fetched as a catalog file
        is, into a part named after the URL, then moved where its header says it belongs (placing.py); a model among
        them draws by its file's name, as a pulled model does."""
        shown = url_for_messages(url)
        part = self.folders[0] / STAGING / f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}.part"
        hub = HUB_URL.fullmatch(url.partition("?")[0])
        remote = hub and RemoteFile(url, hub[1], hub[3], "", hub[3].rpartition("/")[2], hub[2] or "main")
        found = remote and hub_file(remote)
        size = found.size if found else url_size(url)
        self.check_space((size or 0) - self.part_size(part))
        yield {"status": f"pulling {shown}", "reason": "a file named by its URL", "total": size or 0}
        lock = self.lock_for(str(part))
        while not lock.acquire(timeout=1):
            yield {"status": "waiting for another pull", "file": shown}
        try:
            if remote:
                yield from self.downloaded(remote, found, part, shown)
                name = remote.name
            else:
                line = {"status": "downloading", "file": shown, "total": size}
                part.parent.mkdir(parents=True, exist_ok=True)
                name = yield from reported(lambda report: fetch_url(url, part, report), line)
            yield from self.placed(part, name, f"{remote.repo}/{remote.path}" if remote else shown, found)
        finally:
            lock.release()

    def placed(self, part: Path, name: str, source: str, found: HubFile | None) -> Iterator[dict]:
        """Moves a fetched file where its header says it belongs (refused, it is deleted); a model draws by its file's
        name from then on."""
        try:
            folder = folder_for(part, name)
        except ImagineError:
            part.unlink()
            raise
        stem = Path(name).stem
        check_pull_name(stem)
        destination = self.folders[0] / folder / name
        if destination.exists() and destination.stat().st_size != part.stat().st_size:
            message = f"{folder}/{name} is in the models folder already: move it away or remove it, then pull again"
            raise ImagineError(message, 409)
        destination.parent.mkdir(parents=True, exist_ok=True)
        part.replace(destination)  # the same file pulled again: in place of itself
        if folder in ("checkpoints", "diffusion_models"):
            entry = {"file": f"{folder}/{name}", "size": destination.stat().st_size, "ours": True, "source": source,
                     "sha256": found and found.sha256, "revision": found and found.commit}  # fmt: skip
            write_manifest(Manifest(stem, self.folders[0], entry["file"], (entry,)))
        yield {"status": "success", "model": stem, "folder": folder}

    @staticmethod
    def manifest_entry(remote: RemoteFile, found: HubFile, ours: bool) -> dict:
        """A file as the manifest keeps it; `ours`: a pull brought it into the pull folder (removing may delete it),
        where a file that was there before any pull is the user's own and stays."""
        return {"file": remote.destination, "size": found.size, "sha256": found.sha256, "ours": ours,
                "source": f"{remote.repo}/{remote.path}", "revision": found.commit}  # fmt: skip

    def remove(self, name: str, used_elsewhere: set) -> dict:
        """Deletes the files a pull brought for the pulled model `name` that no other model uses: a file another
        pulled model names, or one in `used_elsewhere` (what the other models on disk draw from: real paths), stays.
        Returns what was removed and what was kept."""
        manifests = read_manifests(self.folders)
        manifest = manifests.get(name)
        if manifest is None:
            pulled = ", ".join(sorted(manifests)) or "none"
            raise ImagineError(f"no pulled model {name!r}; the pulled models are: {pulled}", 404)
        others = {entry["file"] for other in manifests.values() if other is not manifest for entry in other.files}
        removed, kept = [], []
        for entry in manifest.files:
            path = manifest.folder / entry["file"]
            if not entry["ours"] or entry["file"] in others or path.resolve() in used_elsewhere:
                kept.append(entry["file"])
            else:
                path.unlink(missing_ok=True)
                removed.append(entry["file"])
        remove_manifest(manifest)
        return {"removed": removed, "kept": kept}


def reported(
    work: Callable[[Callable[[int], None]], object], line: dict, start: int = 0
) -> Generator[dict, None, object]:
    """Runs `work(report)` on a thread of its own and yields `line` with the latest count it reported as
    "completed": as it starts, every PROGRESS_SECONDS, and once it has ended well; returns its result or raises what
    it raised. Closing the generator (its reader left) stops the work at its next report. `start`: the count so far
    (what a resumed fetch had already)."""
    latest, outcome, stop = [start], {}, threading.Event()

    def report(count: int) -> None:
        if stop.is_set():
            raise Stopped
        latest[0] = count

    def run() -> None:
        try:
            outcome["value"] = work(report)
        except BaseException as error:  # handed to the generator's reader
            outcome["error"] = error

    thread = threading.Thread(target=run, name="imagine-pull", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            yield {**line, "completed": latest[0]}
            thread.join(PROGRESS_SECONDS)
    finally:
        stop.set()
        thread.join(timeout=60)
    if "error" in outcome:
        raise outcome["error"]
    yield {**line, "completed": latest[0]}
    return outcome.get("value")
