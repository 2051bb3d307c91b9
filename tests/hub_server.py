"""A local stand-in for the Hugging Face Hub's HTTP API that records every request (the Hub is not reachable here).

It implements what huggingface_hub's `HfApi.create_repo`, `repo_info` and `create_commit` call, as read in
huggingface_hub 2.4's hf_api.py, _commit_api.py and lfs.py: repository creation (409 when it exists), model info,
README metadata validation, the preupload call that decides per file between a regular upload (base64 inside the
commit) and LFS, the LFS batch API with basic transfers (one PUT per object, then verify), and the NDJSON commit.
Safetensors files are answered `lfs`, everything else `regular`, as the Hub does for large binary files. (With
hf_xet installed huggingface_hub sends LFS files over the Xet protocol instead; the tests set HF_HUB_DISABLE_XET=1.)

`fail` names endpoints that answer 500, with an error message quoting the request's Authorization header (a careless
server or proxy could): the job must not repeat it anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("POST", re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$"), "lfs_verify"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    endpoint: str  # the route's name, or "unknown"


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class HubServer:
    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail = set(fail)
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self) -> list[str]:
        return [r.endpoint for r in self.requests]

    # ------------------------------------------------------------------------------------------ endpoints
    def handle(self, req: Request, match: re.Match) -> tuple[int, dict]:
        if req.endpoint in self.fail:
            return 500, {"error": f"storage backend unavailable (request had authorization"
                                  f" {req.headers.get('authorization', '')})"}
        data = json.loads(req.body) if req.body and req.method == "POST" and req.endpoint != "commit" else {}
        if req.endpoint == "create":
            repo_id = f"{data['organization']}/{data['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = Repo(private=data.get("visibility") == "private")
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if req.endpoint == "info":
            repo = self.repos.get(match["repo"])
            if repo is None:
                return 404, {"error": "Repository not found"}
            return 200, {"id": match["repo"], "private": repo.private, "sha": "0" * 40,
                         "siblings": [{"rfilename": name} for name in repo.files]}
        if req.endpoint == "validate":
            return 200, {"errors": [], "warnings": []}
        if req.endpoint == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors")
                                    else "regular", "shouldIgnore": False, "oid": None} for f in data["files"]]}
        if req.endpoint == "lfs_batch":
            return 200, {"transfer": "basic", "objects": [{
                "oid": o["oid"], "size": o["size"], "authenticated": True,
                "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                            "verify": {"href": f"{self.url}/lfs-verify/{o['oid']}"}}} for o in data["objects"]]}
        if req.endpoint == "lfs_put":
            if hashlib.sha256(req.body).hexdigest() != match["oid"]:
                return 400, {"error": "content does not match its oid"}
            self.lfs[match["oid"]] = req.body
            return 200, {}
        if req.endpoint == "lfs_verify":
            stored = self.lfs.get(match["oid"])
            ok = stored is not None and len(stored) == data["size"]
            return (200, {}) if ok else (404, {"error": "object not uploaded"})
        if req.endpoint == "commit":
            repo = self.repos.get(match["repo"])
            if repo is None:
                return 404, {"error": "Repository not found"}
            lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
            files = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.lfs:
                        return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                    files[value["path"]] = self.lfs[value["oid"]]
            repo.files.update(files)
            oid = hashlib.sha1(req.body).hexdigest()
            repo.commits.append({"header": lines[0]["value"], "files": sorted(files), "oid": oid})
            return 200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None}
        return 404, {"error": "not found"}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                endpoint, match = "unknown", None
                for method, pattern, name in ROUTES:
                    found = pattern.match(path)
                    if method == self.command and found:
                        endpoint, match = name, found
                        break
                req = Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}, body, endpoint)
                with server.lock:
                    server.requests.append(req)
                    status, payload = server.handle(req, match) if match else (404, {"error": "not found"})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args) -> None:  # quiet: the requests are recorded instead
                pass

        return Handler
