"""A local, in-memory Hugging Face Hub for tests: just enough of the HTTP API for push and pull.

The server speaks the routes huggingface_hub 2.x uses for ``create_repo`` / ``create_commit`` /
``upload_folder`` (regular, non-LFS uploads: files travel base64-encoded inside the NDJSON commit),
``validate-yaml``, ``model_info`` and ``hf_hub_download`` (``HEAD``/``GET .../resolve/...`` with the
``X-Repo-Commit`` header and a content-specific ``ETag``, the file's git blob id, like the Hub).
It listens on 127.0.0.1 only, serves at most ``max_workers`` requests at a time, refuses bodies over
``max_body_bytes``, and applies a commit all-or-nothing (any bad line: nothing changes), so a test can
assert that a failed push left the repo untouched.

Faults can be injected per route (:meth:`LocalHub.inject`): an HTTP status (e.g. 500), a timeout (the answer
is held back), or a dropped connection (closed without an answer, as when a server dies mid-upload).

Fixtures:
    ``local_hub``: a started server (``.endpoint``, ``.requests``, ``.files(repo_id)``, ``.commits(repo_id)``).
    ``hub_env``: ``local_hub`` plus huggingface_hub/transformers pointed at it in this process, with an
    empty HF cache; ``hub_env.env`` is an environment for subprocesses (``HF_ENDPOINT``, ``HF_HOME``...).
    ``no_retry_wait``: huggingface_hub's retries without their back-off sleeps (fast fault tests).
    ``unreachable_hub``: huggingface_hub pointed at a closed local port (network failure, not offline mode).

``HF_ENDPOINT`` is read once, when huggingface_hub is imported; in-process the fixture therefore patches the
values derived from it (``constants.ENDPOINT``, the URL template, the module-level ``HfApi`` and the
transformers one), and checks the patch took. Subprocesses get the environment variable instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

DEFAULT_USER = "test-user"
_REPO_NAME = r"[A-Za-z0-9][\w.\-]*"
_REPO = rf"(?P<repo>{_REPO_NAME}/{_REPO_NAME})"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def git_blob_id(content: bytes) -> str:
    """The git object id of a file, which the Hub sends as ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class _Commit:
    oid: str
    summary: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    commits: list[_Commit] = field(default_factory=list)

    @property
    def head(self) -> _Commit:
        return self.commits[-1]

    def at(self, revision: str) -> _Commit | None:
        if revision == "main":
            return self.head
        for commit in self.commits:
            if commit.oid == revision:
                return commit
        return None


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.extra = extra or {}


def _validate_metadata(content: str) -> list[str]:
    """Errors the Hub would report for a README's YAML block (safe_load, mapping, no aliases)."""
    match = _YAML_BLOCK.search(content)
    if match is None:
        return []
    block = match.group(2)
    if len(block) > 1 << 20:
        return ["metadata block too large"]
    try:
        for event in yaml.parse(block, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                return ["YAML aliases are not allowed in metadata"]
        data = yaml.safe_load(block)
    except (yaml.YAMLError, ValueError) as error:
        return [f"Invalid YAML in metadata: {str(error).splitlines()[0]}"]
    if data is not None and not isinstance(data, dict):
        return ["metadata must be a mapping"]
    return []


@dataclass
class Fault:
    """What to do instead of answering a route: ``kind`` is "status", "timeout" (sleep ``delay`` s, then 504) or
    "drop" (close the connection without an answer). ``times``: how many requests it hits (None: all)."""

    route: str
    kind: str = "status"
    status: int = 500
    delay: float = 5.0
    times: int | None = None
    method: str | None = None
    hits: int = 0


class LocalHub(ThreadingHTTPServer):
    """The server; start with :meth:`start`, stop with :meth:`stop` (or use the fixtures)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, max_workers: int = 8, max_body_bytes: int = 256 << 20) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.max_body_bytes = max_body_bytes
        self._slots = threading.BoundedSemaphore(max_workers)
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._thread: threading.Thread | None = None
        self._commit_counter = 0
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []

    def inject(self, route: str, kind: str = "status", *, status: int = 500, delay: float = 5.0,
               times: int | None = None, method: str | None = None) -> Fault:
        """Make requests to ``route`` (a route name such as "commit", "resolve", "create_repo", or "*") fail."""
        if kind not in ("status", "timeout", "drop"):
            raise ValueError(f"kind={kind!r}: expected 'status', 'timeout' or 'drop'")
        fault = Fault(route=route, kind=kind, status=status, delay=delay, times=times, method=method)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, method: str, route: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.route not in (route, "*") or (fault.method and fault.method != method):
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                return fault
        return None

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def process_request(self, request, client_address):  # bounded: wait for a free worker slot
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    # -- inspection ---------------------------------------------------------------------------------
    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (copy)."""
        with self._lock:
            commit = self._repos[repo_id].at(revision)
            return dict(commit.files) if commit else {}

    def head_oid(self, repo_id: str) -> str:
        """The commit id of ``main``."""
        with self._lock:
            return self._repos[repo_id].head.oid

    def commits(self, repo_id: str) -> list[str]:
        """Commit summaries, oldest first (the repo's creation commit included)."""
        with self._lock:
            return [c.summary for c in self._repos[repo_id].commits]

    def add_repo_files(self, repo_id: str, files: dict[str, bytes], summary: str = "seed") -> None:
        """Create a repo (if needed) and commit ``files`` directly (test setup)."""
        with self._lock:
            repo = self._repos.get(repo_id) or self._create(repo_id, private=False)
            self._new_commit(repo, summary, {**repo.head.files, **files})

    # -- state changes (lock held) ----------------------------------------------------------------------
    def _create(self, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_id=repo_id, private=private)
        self._repos[repo_id] = repo
        self._new_commit(repo, "initial commit", {".gitattributes": _GITATTRIBUTES})
        return repo

    def _new_commit(self, repo: _Repo, summary: str, files: dict[str, bytes]) -> _Commit:
        self._commit_counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._commit_counter}:{time.time_ns()}".encode()).hexdigest()
        commit = _Commit(oid=oid, summary=summary, files=files)
        repo.commits.append(commit)
        return commit

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.at(unquote(revision))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ---------------------------------------------------------------------------------------
    def create_repo(self, body: dict, **_: Any) -> tuple[int, dict]:
        name, organization = body.get("name"), body.get("organization") or DEFAULT_USER
        if body.get("type", "model") not in (None, "model"):
            raise _HubError(400, "this test hub only serves model repos")
        if not isinstance(name, str) or not re.fullmatch(_REPO_NAME, name) or not re.fullmatch(_REPO_NAME, organization):
            raise _HubError(400, f"invalid repo name {organization}/{name}")
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:
                # Like the Hub: the conflict answer still carries the url (create_repo(exist_ok=True) reads it).
                raise _HubError(409, "You already created this model repo", extra={"url": url})
            self._create(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def preupload(self, body: dict, repo: str, rev: str, **_: Any) -> tuple[int, dict]:
        files = body.get("files")
        if not isinstance(files, list):
            raise _HubError(400, "files must be a list")
        with self._lock:
            commit = self._revision(self._repo(repo), rev)
            existing = {path: git_blob_id(content) for path, content in commit.files.items()}
        return 200, {
            "files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
                for f in files
            ]
        }

    def commit(self, raw: bytes, repo: str, rev: str, query: dict, **_: Any) -> tuple[int, dict]:
        if query.get("create_pr"):
            raise _HubError(400, "pull requests are not supported by this test hub")
        try:
            lines = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _HubError(400, f"commit payload is not NDJSON: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        additions: dict[str, bytes] = {}
        deletions: list[tuple[str, bool]] = []
        for line in lines[1:]:  # validate everything before touching the repo: a commit is all-or-nothing
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                raise _HubError(400, f"invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, "file content must be base64")
                additions[path] = base64.b64decode(value["content"], validate=True)
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((path.rstrip("/"), key == "deletedFolder"))
            elif key == "lfsFile":
                raise _HubError(400, "LFS uploads are not supported by this test hub (preupload answers 'regular')")
            else:
                raise _HubError(400, f"unknown commit operation {key!r}")
        if "README.md" in additions:
            errors = _validate_metadata(additions["README.md"].decode("utf-8", errors="replace"))
            if errors:
                raise _HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        with self._lock:
            target = self._repo(repo)
            parent = self._revision(target, rev)
            if rev != "main" and unquote(rev) != target.head.oid:
                raise _HubError(400, "commits are only accepted on main")
            if header.get("parentCommit") and header["parentCommit"] != target.head.oid:
                raise _HubError(412, "parent commit is not the head of main")
            files = dict(parent.files)
            for path, is_folder in deletions:
                doomed = [p for p in files if p == path or (is_folder and p.startswith(path + "/"))]
                if not doomed:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            files.update(additions)
            commit = self._new_commit(target, header.get("summary") or "", files)
        return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                     "pullRequestUrl": None}

    def validate_yaml(self, body: dict, **_: Any) -> tuple[int, dict]:
        errors = _validate_metadata(str(body.get("content", "")))
        return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": []}

    def whoami(self, **_: Any) -> tuple[int, dict]:
        return 200, {"name": DEFAULT_USER, "type": "user", "orgs": []}

    def model_info(self, repo: str, rev: str | None = None, **_: Any) -> tuple[int, dict]:
        with self._lock:
            target = self._repo(repo)
            commit = self._revision(target, rev or "main")
            files = dict(commit.files)
        return 200, {
            "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid, "private": target.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(c), "blobId": git_blob_id(c)} for p, c in sorted(files.items())],
        }

    def tree(self, repo: str, rev: str, path: str | None = None, **_: Any) -> tuple[int, list]:
        with self._lock:
            commit = self._revision(self._repo(repo), rev)
            files = dict(commit.files)
        prefix = (path or "").strip("/")
        return 200, [
            {"type": "file", "path": p, "size": len(c), "oid": git_blob_id(c)}
            for p, c in sorted(files.items())
            if not prefix or p.startswith(prefix + "/")
        ]


class _Handler(BaseHTTPRequestHandler):
    server: LocalHub
    protocol_version = "HTTP/1.0"  # one request per connection: idle keep-alives never hold a worker slot
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body_bytes:
            raise _HubError(413, f"request body over {self.server.max_body_bytes} bytes")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > self.server.max_body_bytes:
                    raise _HubError(413, f"request body over {self.server.max_body_bytes} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path
        with self.server._lock:
            self.server.requests.append((method, path))
        try:
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(path) if route_method == method else None
                if match is None:
                    continue
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                fault = self.server._fault_for(method, name)
                if fault is not None:
                    return self._apply_fault(fault, method)
                if name == "resolve":
                    return self._resolve(method, **params)
                raw = self._read_body() if method == "POST" else b""
                body: Any = {}
                if raw and (self.headers.get("Content-Type") or "").startswith("application/json"):
                    try:
                        body = json.loads(raw)
                    except json.JSONDecodeError as error:
                        raise _HubError(400, f"invalid JSON body: {error}") from None
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                status, payload = getattr(self.server, name)(body=body, raw=raw, query=query, **params)
                return self._send_json(status, payload)
            raise _HubError(404, f"no route for {method} {path}")
        except _HubError as error:
            return self._send_json(
                error.status, {"error": error.message, **error.extra}, error_code=error.code, commit=error.commit, head=method == "HEAD"
            )

    def _apply_fault(self, fault: Fault, method: str) -> None:
        if fault.kind == "drop":
            self.close_connection = True  # no status line at all: the client sees a broken connection
            return None
        if fault.kind == "timeout":
            time.sleep(fault.delay)
            raise _HubError(504, "injected timeout")
        raise _HubError(fault.status, f"injected fault (HTTP {fault.status})")

    def _resolve(self, method: str, repo: str, rev: str, path: str) -> None:
        server = self.server
        with server._lock:
            commit = server._revision(server._repo(repo), rev)
            content = commit.files.get(path)
        if content is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.oid)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and (m := re.fullmatch(r"bytes=(\d+)-", range_header.strip())):
            start = min(int(m.group(1)), len(content))
        body = content[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{git_blob_id(content)}"')
        self.send_header("X-Repo-Commit", commit.oid)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, *, error_code: str | None = None, commit: str | None = None,
                   head: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", str(payload.get("error", "")))
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if not head:
            self.wfile.write(data)


# -------------------------------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def local_hub():
    """A started :class:`LocalHub` on 127.0.0.1 (stopped after the test)."""
    hub = LocalHub().start()
    try:
        yield hub
    finally:
        hub.stop()


@dataclass
class HubEnv:
    hub: LocalHub
    endpoint: str
    cache_dir: Path
    env: dict[str, str]


@pytest.fixture()
def hub_env(local_hub, tmp_path, monkeypatch):
    """Point huggingface_hub and transformers (in this process) at ``local_hub``, with an empty HF cache."""
    import huggingface_hub
    import huggingface_hub.hf_api as hf_api_module
    from huggingface_hub import constants

    endpoint = local_hub.endpoint
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in (
        ("HF_ENDPOINT", endpoint), ("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)),
        ("HF_HUB_OFFLINE", "0"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("NO_PROXY", "127.0.0.1,localhost"),
        ("no_proxy", "127.0.0.1,localhost"),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # Values huggingface_hub derived from HF_ENDPOINT / HF_HOME when it was imported.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)  # behind huggingface_hub.upload_folder & co.
    try:
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)  # rebuilt lazily with the endpoint
    except ImportError:  # pragma: no cover
        pass
    # The shared HTTP client read proxy settings when it was created: start a fresh one (and again afterwards).
    huggingface_hub.close_session()
    assert huggingface_hub.HfApi().endpoint == endpoint
    try:
        yield HubEnv(hub=local_hub, endpoint=endpoint, cache_dir=cache,
                     env={k: v for k, v in __import__("os").environ.items()})
    finally:
        huggingface_hub.close_session()


@pytest.fixture()
def no_retry_wait(monkeypatch):
    """huggingface_hub retries 5xx and network errors with 1+2+4+8+8 s of back-off: keep the retries, skip the wait."""
    import types

    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time,
                                                             monotonic=time.monotonic, perf_counter=time.perf_counter))


@pytest.fixture()
def unreachable_hub(hub_env, monkeypatch, no_retry_wait):
    """huggingface_hub pointed at a port where nothing listens (HF_HUB_OFFLINE unset), with an empty cache."""
    import huggingface_hub.hf_api as hf_api_module
    from huggingface_hub import constants

    dead = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api_module.api, "endpoint", dead)
    return dead
