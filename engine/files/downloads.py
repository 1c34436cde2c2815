"""Fetching one file into a models folder's staging folder, resumably: from the Hugging Face hub (its metadata, token
and download through huggingface_hub; HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE as it reads them), or from any http(s)
URL (requests); each counted as it comes, and its sha256 checked where one is known. A `.part` file keeps what came,
so that the next try asks for the rest with a Range request."""

import contextlib
import dataclasses
import hashlib
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import httpx2
import requests
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from engine.errors import ImagineError
from engine.files.library import RemoteFile

CHUNK = 2**20  # bytes read at a time, from the network and from disk
URL_TIMEOUT = (10, 60)  # seconds to connect, and between two reads


@dataclasses.dataclass(frozen=True)
class HubFile:
    """What the hub says of a file before it is fetched."""

    size: int
    sha256: str | None  # its LFS etag; None for a small file the hub keeps in git (its etag is a git hash)
    commit: str | None
    location: str  # where its bytes are: the resolve URL, or the CDN it redirects to


def hub_file(remote: RemoteFile) -> HubFile:
    """The hub's answer for `remote` (one HEAD request), or an ImagineError saying why there is none and what to do."""
    url = hf_hub_url(remote.repo, remote.path, revision=remote.revision)
    with hub_errors(remote):
        metadata = get_hf_file_metadata(url)
    etag = (metadata.etag or "").strip('"').removeprefix("W/").strip('"')
    sha256 = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
    return HubFile(metadata.size or remote.size, remote.sha256 or sha256, metadata.commit_hash, metadata.location)


def fetch_hub_file(remote: RemoteFile, found: HubFile, part: Path, report: Callable[[int], None]) -> None:
    """Fetches the rest of `remote` into `part` (what is there already is kept: a Range request asks for the rest),
    calling `report(bytes so far)` as chunks come."""
    done = part.stat().st_size if part.exists() else 0
    with hub_errors(remote), part.open("ab") as file:
        http_get(
            found.location,
            file,
            resume_size=done,
            headers=build_hf_headers(),
            expected_size=found.size,
            tqdm_class=counting(report),
        )


def url_size(url: str) -> int | None:
    """The size of the file at `url` as its server tells it (a HEAD request, redirects followed), or None."""
    try:
        response = requests.head(url, allow_redirects=True, timeout=URL_TIMEOUT)
    except requests.RequestException as error:
        raise ImagineError(f"cannot reach {url_for_messages(url)} ({type(error).__name__})", 502) from None
    if response.status_code >= 400:
        raise ImagineError(f"{url_for_messages(url)} answered {response.status_code} {response.reason}", 502)
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def fetch_url(url: str, part: Path, report: Callable[[int], None]) -> str:
    """Fetches the rest of `url` into `part`, as fetch_hub_file does; returns the file's name as the server gives it
    (Content-Disposition) or as the URL ends."""
    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=URL_TIMEOUT) as response:
            if response.status_code == 416:  # all of it is here already
                return file_name(response, url)
            if response.status_code >= 400:
                raise ImagineError(f"{url_for_messages(url)} answered {response.status_code} {response.reason}", 502)
            append = response.status_code == 206
            with part.open("ab" if append else "wb") as file:
                size = done if append else 0
                for chunk in response.iter_content(CHUNK):
                    file.write(chunk)
                    size += len(chunk)
                    report(size)
            return file_name(response, url)
    except requests.RequestException as error:
        message = f"cannot fetch {url_for_messages(url)} ({type(error).__name__}); pull it again to resume"
        raise ImagineError(message, 502) from None


def file_sha256(path: Path, report: Callable[[int], None]) -> str:
    """The file's sha256, `report(bytes read)` as it is read."""
    digest, done = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            report(done)
    return digest.hexdigest()


def counting(report: Callable[[int], None]) -> type:
    """A progress-bar class for huggingface_hub's http_get that reports the bytes so far instead of drawing a bar."""

    class Counter:
        def __init__(self, initial: int = 0, **_):
            self.n = initial

        def update(self, n: int = 1) -> None:
            self.n += n
            report(self.n)

        def close(self) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    return Counter


@contextlib.contextmanager
def hub_errors(remote: RemoteFile):
    """Turns what huggingface_hub raises for a file into an ImagineError that names the file and what to do."""
    where = f"{remote.repo}/{remote.path}"
    try:
        yield
    except GatedRepoError:
        message = (
            f"{remote.repo} is gated: accept its licence on https://huggingface.co/{remote.repo} with your account, "
            "then set HF_TOKEN to an access token of that account where the server runs"
        )
        raise ImagineError(message, 403) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        raise ImagineError(f"the hub has no {where} (moved or renamed?)", 502) from None
    except OfflineModeIsEnabled:
        raise ImagineError("cannot reach the hub: HF_HUB_OFFLINE is set; models already here still draw", 503) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "an error"
        raise ImagineError(f"the hub answered {status} for {where}; try again later", 502) from None
    except (httpx2.HTTPError, OSError) as error:
        message = f"cannot reach the hub for {where} ({type(error).__name__}); pull it again to resume"
        raise ImagineError(message, 503) from None


def file_name(response: requests.Response, url: str) -> str:
    """The name the server gives a download (Content-Disposition), else the last part of the URL's path."""
    disposition = response.headers.get("Content-Disposition", "")
    match = re.search(r"""filename\*?=(?:UTF-8'')?["']?([^"';]+)""", disposition)
    name = urllib.parse.unquote(match[1]) if match else urllib.parse.urlsplit(response.url).path.rpartition("/")[2]
    return Path(name).name or "download"


def url_for_messages(url: str) -> str:
    """The URL without its query, which may hold a token (Civitai's ?token=...)."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()
