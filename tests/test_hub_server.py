"""The hub stand-in (tests/hub_server.py) speaks the protocol huggingface_hub expects, faults included."""

import hashlib
import random
import socket
import urllib.request

import huggingface_hub
import pytest
from hub_server import HubServer
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

REPO = "Lykon/DreamShaper"
GATED = "black-forest-labs/FLUX.1-dev"
CIVITAI = "/api/download/models/128713"
WEIGHTS = random.Random(0).randbytes(300_000)
CONFIG = b'{"_class_name": "UNet2DConditionModel"}'
# huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB) and resumes after the last whole
# one: only a file cut past a chunk resumes past 0.
BIG = random.Random(1).randbytes(constants.DOWNLOAD_CHUNK_SIZE + 100_000)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any look-up or connection beyond 127.0.0.1 is refused and fails the test: nothing here may reach the hub."""
    reached = []
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def refuse_beyond_loopback(host):
        if host not in ("127.0.0.1", "::1", "localhost"):
            reached.append(host)
            raise ConnectionRefusedError(f"tests stay on 127.0.0.1, not {host}")

    def guarded_getaddrinfo(host, *args, **kwargs):
        refuse_beyond_loopback(host)
        return getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse_beyond_loopback(address[0])
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield reached
    # huggingface_hub turns a refused connection into its own errors, or a quiet fallback: check here as well.
    assert not reached, f"a test tried to reach {reached}"


@pytest.fixture
def hub(monkeypatch):
    """The stand-in, huggingface_hub pointed at it: a public repo (checkpoints and a sub-folder file), a gated repo
    and a Civitai download."""
    public = {"DreamShaper_8.safetensors": WEIGHTS, "big.safetensors": BIG, "unet/config.json": CONFIG}
    repos = {REPO: public, GATED: {"ae.safetensors": CONFIG}}
    files = {CIVITAI: (WEIGHTS, "dreamshaper_8.safetensors")}
    with HubServer(repos, gated={GATED}, token="hf_test", files=files, redirect_files=True) as server:
        server.point_huggingface_hub(monkeypatch)
        assert server.url == constants.ENDPOINT and server.url.startswith("http://127.0.0.1:")
        yield server


def download(tmp_path, filename, repo=REPO, token=False, **kwargs):
    """hf_hub_download into tmp_path/models, with its own cache and no stored token."""
    models, cache = tmp_path / "models", tmp_path / "cache"
    return hf_hub_download(repo, filename, local_dir=models, cache_dir=cache, token=token, **kwargs)


def requests_for(hub, path):
    """(method, Range) of the requests for one path: the first call of a process also asks /api/agent-harnesses."""
    return [(method, sent_range) for method, sent_path, sent_range in hub.requests if sent_path == path]


def test_the_guard_refuses_anything_beyond_loopback(loopback_only):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("huggingface.co", 443))
    assert loopback_only == ["huggingface.co"]
    loopback_only.clear()


def test_hf_hub_download_writes_the_exact_bytes_into_local_dir(hub, tmp_path):
    path = download(tmp_path, "unet/config.json")
    assert path == str(tmp_path / "models" / "unet" / "config.json")
    assert (tmp_path / "models" / "unet" / "config.json").read_bytes() == CONFIG
    assert requests_for(hub, f"/{REPO}/resolve/main/unet/config.json") == [("HEAD", None), ("GET", None)]


def test_the_metadata_carries_the_commit_sha256_and_size_and_no_xet(hub):
    url = hf_hub_url(REPO, "DreamShaper_8.safetensors")
    assert url == f"{hub.url}/{REPO}/resolve/main/DreamShaper_8.safetensors"
    metadata = get_hf_file_metadata(url)
    assert metadata.commit_hash == hub.commit(REPO)
    assert metadata.etag == hashlib.sha256(WEIGHTS).hexdigest()
    assert metadata.size == len(WEIGHTS)
    # Without Xet headers, huggingface_hub downloads over plain HTTP even with hf_xet installed.
    assert metadata.xet_file_data is None


def test_dry_run_reports_the_size_before_any_get(hub, tmp_path):
    info = download(tmp_path, "DreamShaper_8.safetensors", dry_run=True)
    assert (info.file_size, info.will_download, info.commit_hash) == (len(WEIGHTS), True, hub.commit(REPO))
    assert requests_for(hub, f"/{REPO}/resolve/main/DreamShaper_8.safetensors") == [("HEAD", None)]
    assert not (tmp_path / "models" / "DreamShaper_8.safetensors").exists()


def test_a_cut_download_resumes_with_a_range_past_zero_and_ends_with_the_exact_bytes(hub, tmp_path):
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    hub.cut_after(f"{REPO}/big.safetensors", chunk + 1_000)
    # huggingface_hub resumes within the same call, after a second's sleep.
    path = download(tmp_path, "big.safetensors")
    resolve = f"/{REPO}/resolve/main/big.safetensors"
    assert requests_for(hub, resolve) == [("HEAD", None), ("GET", None), ("GET", f"bytes={chunk}-")]
    with open(path, "rb") as file:
        assert file.read() == BIG


def test_a_gated_repo_raises_gated_repo_error_without_the_token_and_downloads_with_it(hub, tmp_path):
    for token in (False, "hf_wrong"):
        with pytest.raises(GatedRepoError) as error:
            download(tmp_path, "ae.safetensors", repo=GATED, token=token)
        assert error.value.response.status_code == 401
    path = download(tmp_path, "ae.safetensors", repo=GATED, token="hf_test")
    with open(path, "rb") as file:
        assert file.read() == CONFIG


def test_an_unknown_file_raises_entry_not_found_and_an_unknown_repo_repository_not_found(hub, tmp_path):
    with pytest.raises(RemoteEntryNotFoundError):
        download(tmp_path, "DreamShaper_9.safetensors")
    # GatedRepoError is a RepositoryNotFoundError too: the exact type tells them apart.
    with pytest.raises(RepositoryNotFoundError) as error:
        download(tmp_path, "model.safetensors", repo="nobody/nothing")
    assert error.type is RepositoryNotFoundError


def test_a_corrupt_file_is_served_with_its_true_sha256_in_the_headers(hub, tmp_path):
    hub.corrupt(f"{REPO}/DreamShaper_8.safetensors")
    metadata = get_hf_file_metadata(hf_hub_url(REPO, "DreamShaper_8.safetensors"))
    # hf_hub_download itself does not check the sha256: it keeps the flipped byte, and only a check sees it.
    with open(download(tmp_path, "DreamShaper_8.safetensors"), "rb") as file:
        served = file.read()
    assert len(served) == len(WEIGHTS) and served != WEIGHTS
    assert metadata.etag == hashlib.sha256(WEIGHTS).hexdigest() != hashlib.sha256(served).hexdigest()


def test_the_tree_lists_files_with_their_lfs_sha256_and_the_info_the_commit(hub):
    files = {entry.path: entry for entry in HfApi().list_repo_tree(REPO, recursive=True) if hasattr(entry, "lfs")}
    assert files.keys() == {"DreamShaper_8.safetensors", "big.safetensors", "unet/config.json"}
    weights = files["DreamShaper_8.safetensors"]
    assert (weights.size, weights.lfs.sha256) == (len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest())
    # The module-level functions belong to an HfApi made at import: point_huggingface_hub moves it too.
    assert huggingface_hub.model_info(REPO).sha == hub.commit(REPO)


def test_a_civitai_download_redirects_to_the_file_named_in_its_content_disposition(hub):
    with urllib.request.urlopen(hub.url + CIVITAI) as answer:
        assert answer.headers["Content-Disposition"] == 'attachment; filename="dreamshaper_8.safetensors"'
        assert answer.read() == WEIGHTS
    with urllib.request.urlopen(urllib.request.Request(hub.url + CIVITAI, headers={"Range": "bytes=1000-"})) as answer:
        assert answer.status == 206 and answer.read() == WEIGHTS[1000:]
    assert hub.count("GET", CIVITAI) == 2 and hub.count("GET", "/cdn" + CIVITAI) == 2
