"""A minimal, in-memory stand-in for the Hugging Face Hub HTTP API, for upload tests.

It speaks just enough of the protocol that ``huggingface_hub`` 2.x uses for
``HfApi.create_repo`` / ``HfApi.create_commit`` (and therefore ``PreTrainedModel.push_to_hub``)
and for downloads (``hf_hub_download`` / ``from_pretrained(repo_id)``):

=========================================================  ===========================================
``POST /api/repos/create``                                 create a model repo (409 if it exists)
``GET  /api/models/{repo}[/revision/{rev}]``                repo info (sha, siblings)
``POST /api/validate-yaml``                                model-card metadata check (always valid)
``POST /api/models/{repo}/preupload/{rev}``                upload mode per file: ``lfs`` for
                                                           ``*.safetensors``/``*.bin``, else ``regular``
``POST /{repo}.git/info/lfs/objects/batch``                LFS batch API, *basic* transfer only
``PUT  /__lfs__/{oid}``                                    LFS object upload (sha256 checked)
``POST /__lfs__/verify``                                   LFS verify
``POST /api/models/{repo}/commit/{rev}``                   NDJSON commit: ``file`` (base64, regular) and
                                                           ``lfsFile`` (by oid) additions, deletions
``HEAD|GET /{repo}/resolve/{rev}/{path}``                  file download (``X-Repo-Commit``, ``ETag``)
=========================================================  ===========================================

Not implemented (the client must not need them): Xet storage (set ``HF_HUB_DISABLE_XET=1``),
multipart LFS uploads, pull requests, branches other than ``main``, copies, datasets/spaces.

Safety: binds 127.0.0.1 only, on a free port; requests carrying the wrong bearer token get 401;
bodies over ``max_body`` bytes are refused; the server shuts itself down after ``lifetime``
seconds even if the test forgets to stop it.

Example:
    >>> with FakeHub(token="hf_test") as hub:          # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url
    ...     ...                                        # push_to_hub in a subprocess
    ...     hub.repos["me/model"].files["config.json"]
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass
class Repo:
    """One repo: the files of ``main`` and its commit history."""

    repo_id: str
    private: bool = False
    files: Dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set = field(default_factory=set)
    commits: List[Dict[str, Any]] = field(default_factory=list)
    head: str = "0" * 40


class FakeHub:
    """In-memory Hub for tests; see the module docstring for the endpoints."""

    def __init__(self, token: str = "hf_fake_token", user: str = "tester", lifetime: float = 300.0,
                 max_body: int = 512 * 2**20) -> None:
        self.token = token
        self.user = user
        self.lifetime = lifetime
        self.max_body = max_body
        self.repos: Dict[str, Repo] = {}
        self.lfs_objects: Dict[str, bytes] = {}
        self.log: List[Tuple[str, str, int]] = []  # (method, path, status)
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "call start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ state changes
    def _commit(self, repo: Repo, header: Dict[str, Any], adds: Dict[str, bytes], lfs: set, deletes: List[str]) -> str:
        with self._lock:
            for path in deletes:
                repo.files.pop(path, None)
                repo.lfs_paths.discard(path)
            repo.files.update(adds)
            repo.lfs_paths |= lfs
            repo.lfs_paths -= set(adds) - lfs
            oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{sorted(adds)}".encode()).hexdigest()
            repo.commits.append({"oid": oid, "summary": header.get("summary"),
                                 "description": header.get("description"), "files": sorted(adds),
                                 "deleted": deletes})
            repo.head = oid
            return oid


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    # quiet: tests read hub.log instead
    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > self.hub.max_body:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, *, headers: Optional[Dict[str, str]] = None,
              raw: Optional[bytes] = None, head: bool = False) -> None:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)
        self.hub.log.append((self.command, self.path, status))

    def _error(self, status: int, message: str, code: Optional[str] = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers, head=head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _repo(self, repo_id: str) -> Optional[Repo]:
        return self.hub.repos.get(repo_id)

    # ------------------------------------------------------------------ dispatch
    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self, head: bool = False) -> None:
        try:
            body = self._body() if self.command in ("POST", "PUT") else b""
        except ValueError as exc:
            self._error(413, str(exc))
            return
        path = self.path.split("?", 1)[0]
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit_route),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/__lfs__/verify", self._lfs_verify),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        method = "GET" if head else self.command
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                try:
                    handler(body=body, head=head, **{k: v for k, v in match.groupdict().items() if v is not None})
                except Exception as exc:  # a bug in the fake must surface as a 500, not hang the client
                    self._error(500, f"fake hub error: {type(exc).__name__}: {exc}")
                return
        self._error(404, f"fake hub: no route for {self.command} {path}")

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, body: bytes, head: bool) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") not in (None, "model"):
            return self._error(400, "fake hub: only model repos")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:  # the real Hub also returns the url with the 409
                return self._send(409, {"error": "You already created this model repo", "url": url},
                                  headers={"X-Error-Message": "You already created this model repo"})
            private = payload.get("private") or payload.get("visibility") == "private"
            self.hub.repos[repo_id] = Repo(repo_id=repo_id, private=bool(private))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes, head: bool) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _repo_info(self, body: bytes, head: bool, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        if r is None:
            return self._error(404, "Repository not found", "RepoNotFound", head=head)
        self._send(200, {"id": repo, "modelId": repo, "sha": r.head, "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(r.files)]}, head=head)

    def _preupload(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if self._repo(repo) is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        files = json.loads(body)["files"]
        out = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False, "oid": None} for f in files]
        self._send(200, {"files": out, "commitOid": self._repo(repo).head})

    def _lfs_batch(self, body: bytes, head: bool, repo: str) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        if "basic" not in payload.get("transfers", ["basic"]):
            return self._error(400, "fake hub: only the basic LFS transfer is supported")
        objects = []
        for obj in payload["objects"]:
            entry: Dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/__lfs__/{obj['oid']}"},
                                    "verify": {"href": f"{self.hub.url}/__lfs__/verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, body: bytes, head: bool, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "LFS object does not match its oid")
        self.hub.lfs_objects[oid] = body
        self._send(200, {})

    def _lfs_verify(self, body: bytes, head: bool) -> None:
        payload = json.loads(body)
        data = self.hub.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            return self._error(404, "LFS object not found")
        self._send(200, {})

    def _commit_route(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        r = self._repo(repo)
        if r is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        if rev != "main":
            return self._error(400, "fake hub: only the main branch")
        header: Dict[str, Any] = {}
        adds: Dict[str, bytes] = {}
        lfs: set = set()
        deletes: List[str] = []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return self._error(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                adds[value["path"]] = data
                lfs.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
            else:
                return self._error(400, f"fake hub: unsupported commit operation {key!r}")
        oid = self.hub._commit(r, header, adds, lfs, deletes)
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def _resolve(self, body: bytes, head: bool, repo: str, rev: str, file: str) -> None:
        r = self._repo(repo)
        if r is None:
            return self._error(404, "Repository not found", "RepoNotFound", head=head)
        if rev not in ("main", r.head):
            return self._error(404, "Invalid rev id", "RevisionNotFound", head=head)
        data = r.files.get(file)
        if data is None:
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        etag = hashlib.sha256(data).hexdigest() if file in r.lfs_paths else hashlib.sha1(data).hexdigest()
        self._send(200, raw=data, head=head, headers={"X-Repo-Commit": r.head, "ETag": f'"{etag}"'})
