"""A local stand-in for the Hugging Face hub (and for a Civitai-like download URL), for the tests of pulling models.

`HubServer` answers on 127.0.0.1 what huggingface_hub 2.x asks of huggingface.co:

- `HEAD`/`GET /<owner>/<name>/resolve/<revision>/<path>`: the file, with `X-Repo-Commit`, the quoted sha256 as `ETag`
  and `X-Linked-Etag`, `X-Linked-Size`, `Content-Length` and `Accept-Ranges`; `Range: bytes=N-` gets a 206. Every
  file is answered as the hub answers an LFS file, and never with Xet headers (`X-Xet-Hash`, a `xet-auth` link), so
  the client always downloads over plain HTTP, even with hf_xet installed.
- `GET /api/models/<owner>/<name>/tree/<revision>[/<folder>][?recursive=true]`: the listing, LFS details included.
- `GET /api/models/<owner>/<name>[/revision/<revision>]`: the model info, with `sha` and `siblings`.
- Errors carry the hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`), which is
  what makes huggingface_hub raise `RepositoryNotFoundError`, `RevisionNotFoundError`, `RemoteEntryNotFoundError`
  and `GatedRepoError`. A gated repo's files answer 401 without the token; its listing and info stay public, as on
  the hub. Revisions are `main` and the repo's commit (`commit(repo)`).
- Plain `files` (a Civitai download URL): the content with `Content-Disposition: attachment; filename="..."`, and
  with `redirect_files` first a 302 to it, as Civitai sends to its storage.

Faults, switched on per test: `cut_after(key, n)` closes the connection after n bytes of the next GET, `corrupt(key)`
flips a byte of every answer while the headers keep the true sha256. A file's key is `"<owner>/<name>/<path>"` for a
repo file and its URL path for a plain file. `requests` lists `(method, path, Range header)` as they arrived.

Pointing huggingface_hub at the server: huggingface_hub reads HF_ENDPOINT once, at import (conftest imports it
through diffusers), so setting the variable inside a test changes nothing in this process; a subprocess started with
HF_ENDPOINT=server.url is fine. `endpoint=server.url` (hf_hub_download, hf_hub_url, snapshot_download, HfApi) moves
the downloads but not all: the first call of a process that builds the hub's headers also fetches
`{constants.ENDPOINT}/api/agent-harnesses` (best effort, errors swallowed), from huggingface.co unless ENDPOINT moved.
`point_huggingface_hub(monkeypatch)` moves everything: `constants.ENDPOINT`, the URL template `hf_hub_url` formats
(built from ENDPOINT at import: patching ENDPOINT alone leaves downloads on huggingface.co) and the endpoint of the
`HfApi` made at import behind `huggingface_hub.model_info`, `list_repo_tree` and the like. The stand-in answers 404 to
`/api/agent-harnesses`, so huggingface_hub caches nothing under HF_HOME.
"""

import hashlib
import json
import re
import sys
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from huggingface_hub import constants, hf_api

# Matched against the raw (quoted) path: a revision such as refs/pr/1 arrives as refs%2Fpr%2F1.
RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?")
MODEL_INFO = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?")
RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _read(content: bytes | Path) -> bytes:
    return content.read_bytes() if isinstance(content, Path) else content


def _lfs_pointer(content: bytes) -> bytes:
    """The pointer file git keeps for an LFS file: the tree's `oid` is its git blob id."""
    sha256 = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _flip_a_byte(content: bytes) -> bytes:
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]


class HubServer:
    """Repos (`"owner/name"` -> {path in repo: bytes or Path}) and plain `files` (URL path -> (content, filename))
    served on 127.0.0.1 while the context is open; `url` is the address to point clients at."""

    def __init__(
        self,
        repos: dict[str, dict[str, bytes | Path]] | None = None,
        *,
        gated: Iterable[str] = (),
        token: str | None = None,
        files: dict[str, tuple[bytes | Path, str]] | None = None,
        redirect_files: bool = False,
    ):
        self.repos = {
            repo: {path: _read(c) for path, c in repo_files.items()} for repo, repo_files in (repos or {}).items()
        }
        self.files = {url_path: (_read(c), name) for url_path, (c, name) in (files or {}).items()}
        self.gated = set(gated)
        self.token = token
        self.redirect_files = redirect_files
        self.requests: list[tuple[str, str, str | None]] = []
        self.cuts: dict[str, list] = {}  # key -> the bytes each of its next GETs sends before the connection closes
        self.corrupted: set[str] = set()

    def __enter__(self):
        self._httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        # A short poll: stopping waits for it, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo: str) -> str:
        """The repo's one commit: fixed, so a test can pin it as a revision."""
        return hashlib.sha1(repo.encode()).hexdigest()

    def cut_after(self, key: str, *n_bytes: int) -> None:
        """The next GETs of the file, one for each of `n_bytes`, send that many bytes of their body, then the connection
        closes."""
        self._check(key)
        self.cuts[key] = list(n_bytes)

    def corrupt(self, key: str) -> None:
        """From now on the file's bytes have one flipped; its headers still carry the true sha256 and size."""
        self._check(key)
        self.corrupted.add(key)

    def count(self, method: str, path: str) -> int:
        """How many `method` requests reached the URL path `path`."""
        return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))

    def point_huggingface_hub(self, monkeypatch) -> None:
        """Make every call of huggingface_hub reach this server for one test, as HF_ENDPOINT set before import would."""
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}"
        )

    def _check(self, key: str) -> None:
        owner, _, rest = key.partition("/")
        name, _, path = rest.partition("/")
        if key not in self.files and path not in self.repos.get(f"{owner}/{name}", {}):
            raise ValueError(f"no file has the key {key!r}: use '<owner>/<name>/<path>' or a plain file's URL path")


class _QuietServer(ThreadingHTTPServer):
    # huggingface_hub's shared client keeps connections open, each holding a handler thread: they must not keep
    # the test process alive.
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that gives up mid-answer (or a connection we cut) is part of the tests, not a failure to print.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive with a Content-Length on every answer, as the hub: a cut connection then reads as a short body.
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        """Quiet: tests read `HubServer.requests` instead of a log on stderr."""

    def do_GET(self):
        hub: HubServer = self.server.hub
        url = urlsplit(self.path)
        hub.requests.append((self.command, unquote(url.path), self.headers.get("Range")))
        if url.path in hub.files:
            return self.send_plain_file(url.path, redirect=hub.redirect_files)
        if url.path.startswith("/cdn/") and url.path[4:] in hub.files:
            return self.send_plain_file(url.path[4:], redirect=False)
        for pattern, answer in ((RESOLVE, self.send_repo_file), (TREE, self.send_tree), (MODEL_INFO, self.send_info)):
            if match := pattern.fullmatch(url.path):
                return answer(*(unquote(group) if group else None for group in match.groups()), parse_qs(url.query))
        # Any other path, /api/agent-harnesses among them: the hub's plain 404, which huggingface_hub shrugs off.
        self.send_error_json(404, None, "Not Found")

    do_HEAD = do_GET

    def send_repo_file(self, repo, revision, path, _query):
        if not self.check_repo(repo, revision, files=True):
            return
        hub: HubServer = self.server.hub
        if path not in hub.repos[repo]:
            return self.send_error_json(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": hub.commit(repo)})
        content = hub.repos[repo][path]
        sha256 = hashlib.sha256(content).hexdigest()
        headers = {"X-Repo-Commit": hub.commit(repo), "ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"'}
        self.send_content(f"{repo}/{path}", content, {**headers, "X-Linked-Size": str(len(content))})

    def send_plain_file(self, url_path, redirect):
        if redirect:
            self.send_response(302)
            self.send_header("Location", "/cdn" + url_path)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        content, filename = self.server.hub.files[url_path]
        self.send_content(url_path, content, {"Content-Disposition": f'attachment; filename="{filename}"'})

    def send_tree(self, repo, revision, folder, query):
        if not self.check_repo(repo, revision):
            return
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = f"{folder}/" if folder else ""
        entries = {}
        for path, content in sorted(self.server.hub.repos[repo].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            folders = [prefix + "/".join(parts[:i]) for i in range(1, len(parts))]
            for name in folders if recursive else folders[:1]:
                # A folder's oid is a git tree id on the hub; any fixed 40-hex stands in for it.
                entries[name] = {"type": "directory", "oid": _git_blob_id(name.encode()), "size": 0, "path": name}
            if recursive or len(parts) == 1:
                pointer = _lfs_pointer(content)
                lfs = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": len(pointer)}
                file = {"type": "file", "oid": _git_blob_id(pointer), "size": len(content), "path": path}
                entries[path] = {**file, "lfs": lfs}
        if folder and not entries:
            return self.send_error_json(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        self.send_json(list(entries.values()))

    def send_info(self, repo, revision, _query):
        if not self.check_repo(repo, revision or "main"):
            return
        hub: HubServer = self.server.hub
        gated = "manual" if repo in hub.gated else False
        info = {"id": repo, "modelId": repo, "sha": hub.commit(repo), "private": False, "gated": gated}
        self.send_json({**info, "siblings": [{"rfilename": path} for path in sorted(hub.repos[repo])]})

    def check_repo(self, repo, revision, files=False) -> bool:
        """Answers the hub's error and returns False when the repo, the token (for files) or the revision is wrong."""
        hub: HubServer = self.server.hub
        authorized = hub.token is not None and self.headers.get("Authorization") == f"Bearer {hub.token}"
        if repo not in hub.repos:
            self.send_error_json(404, "RepoNotFound", "Repository not found")
        elif files and repo in hub.gated and not authorized:
            message = (
                f"Access to model {repo} is restricted. You must have access to it and be authenticated to access it."
                " Please log in."
            )
            self.send_error_json(401, "GatedRepo", message)
        elif revision not in ("main", hub.commit(repo)):
            self.send_error_json(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        else:
            return True
        return False

    def send_content(self, key, content, headers):
        """The file or the part a `Range: bytes=N-[M]` asks for, with the faults switched on for `key`."""
        hub: HubServer = self.server.hub
        size, start, end, status = len(content), 0, len(content) - 1, 200
        if requested := self.headers.get("Range"):
            match = RANGE.fullmatch(requested.strip())
            if not match or int(match[1]) >= size or int(match[2] or size) < int(match[1]):
                return self.send_error_json(
                    416, None, f"Range {requested} not satisfiable", {"Content-Range": f"bytes */{size}"}
                )
            start, end, status = int(match[1]), min(int(match[2] or size - 1), size - 1), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "HEAD":
            return
        body = (_flip_a_byte(content) if key in hub.corrupted else content)[start : end + 1]
        if hub.cuts.get(key):
            body, self.close_connection = body[: hub.cuts[key].pop(0)], True
        self.wfile.write(body)

    def send_json(self, value, status=200, headers=None):
        body = json.dumps(value).encode()
        self.send_response(status)
        for name, header in {**(headers or {}), "Content-Type": "application/json"}.items():
            self.send_header(name, header)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error_json(self, status, error_code, message, headers=None):
        """An error as the hub sends it: `X-Error-Code` and `X-Error-Message` headers, `{"error": ...}` body."""
        headers = {**(headers or {}), "X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self.send_json({"error": message}, status, headers)
