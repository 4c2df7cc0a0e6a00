"""A local stand-in for the Hub's HTTP API, serving the endpoints huggingface_hub 1.33 calls to publish, and
recording every request (method, path, query, headers, body) so tests can check exactly what was sent.

Endpoints (read from `hf_api.py` / `_commit_api.py`): POST /api/repos/create, POST /api/validate-yaml,
POST /api/{type}s/{repo}/preupload/{rev}, POST /api/{type}s/{repo}/commit/{rev} (NDJSON),
GET /api/{type}s/{repo}/tree/{rev}[/{path}], GET /api/{type}s/{repo}[/revision/{rev}], GET /api/whoami-v2.
Every file is declared "regular" at preupload (content inline, base64, in the commit), so no LFS/Xet transfer is
needed; the tree listing still reports LFS metadata (sha256) for binary suffixes, as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"  # the token the fake Hub accepts: must never be written anywhere
LFS_SUFFIXES = (".parquet", ".safetensors", ".png", ".bin")
_REPO = r"(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint to give HfApi."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token  # when set, requests must carry "Authorization: Bearer <token>"
        self.requests: list[Recorded] = []
        self.repos: dict[tuple[str, str], Repo] = {}
        self.failures: list[tuple[str, int]] = []  # (path regex, status): the next matching request fails once
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------- views
    def calls(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def commits(self) -> list[Recorded]:
        return self.calls("POST", r"/commit/")

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        return self.repos[(repo_type, repo_id)]

    def fail_next(self, pattern: str, status: int) -> None:
        self.failures.append((pattern, status))

    # ---------------------------------------------------------------------------------------- handling
    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict]:
        parsed = urlparse(raw_path)
        path = unquote(parsed.path)
        with self._lock:
            self.requests.append(Recorded(method, path, parse_qs(parsed.query), headers, body))
            for i, (pattern, status) in enumerate(self.failures):
                if re.search(pattern, path):
                    del self.failures[i]
                    return status, {"error": f"injected {status}"}, {}
            if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}, {}
            return self._route(method, path, parse_qs(parsed.query), body)

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, Any, dict]:
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}}, {}
        if m := re.fullmatch(rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)", path):
            return self._with_repo(m, lambda repo: self._preupload(repo, json.loads(body)))
        if m := re.fullmatch(rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", path):
            return self._with_repo(m, lambda repo: self._commit(repo, body))
        if m := re.fullmatch(rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path):
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._with_repo(m, lambda repo: self._tree(repo, m.group("sub") or "", recursive))
        if m := re.fullmatch(rf"/api/{_REPO}(?:/revision/(?P<rev>.+))?", path):
            return self._with_repo(m, self._info)
        return 404, {"error": f"fake hub: no route for {method} {path}"}, {}

    def _with_repo(self, m: re.Match, action) -> tuple[int, Any, dict]:
        key = (m.group("type")[:-1], m.group("repo"))
        if key not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return action(self.repos[key])

    def _create(self, payload: dict) -> tuple[int, Any, dict]:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        # Like the Hub: a new repo starts with one commit holding .gitattributes.
        repo.files[".gitattributes"] = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
        repo.commits.append(hashlib.sha1(f"{repo_id}-init".encode()).hexdigest())
        self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _preupload(self, repo: Repo, payload: dict) -> tuple[int, Any, dict]:
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_id(repo.files[f["path"]]) if f["path"] in repo.files else None,
            }
            for f in payload["files"]
        ]
        return 200, {"files": files}, {}

    def _commit(self, repo: Repo, body: bytes) -> tuple[int, Any, dict]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "commit payload must start with a header"}, {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                repo.files.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                for path in [p for p in repo.files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del repo.files[path]
            else:
                return 422, {"error": f"fake hub: unsupported commit operation {line['key']}"}, {}
        oid = hashlib.sha1(f"{repo.repo_id}-{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append(oid)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return 200, {"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{oid}", "commitOid": oid}, {}

    def _tree(self, repo: Repo, sub: str, recursive: bool) -> tuple[int, Any, dict]:
        prefix = sub.rstrip("/") + "/" if sub else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(repo.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries[path] = entry
        return 200, list(entries.values()), {}

    def _info(self, repo: Repo) -> tuple[int, Any, dict]:
        return 200, {"id": repo.repo_id, "sha": repo.commits[-1], "private": repo.private, "siblings": []}, {}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload, extra = hub.handle(self.command, self.path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet, and never echo headers
            pass

    return Handler
