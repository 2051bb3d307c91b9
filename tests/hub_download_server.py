"""A local HTTP server that answers like the Hugging Face Hub for one model repository, or fails on purpose.

huggingface_hub reads HF_ENDPOINT when it is imported, so point a new process at `hub.endpoint`. The server
answers what `snapshot_download` asks for: the repository's info at a revision, its file tree, and each file
(HEAD for the metadata, GET for the bytes). It records every request, so a test can tell what was downloaded.
`fail_with(status, headers)` makes every request answer that status; `fail_with("disconnect")` closes every
connection without an answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, model_dir: Path | None = None):
        self.repo_id = repo_id
        self.files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()} if model_dir else {}
        self.failure: tuple[int, dict[str, str]] | str | None = None
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_with(self, failure: int | str, headers: dict[str, str] | None = None) -> None:
        self.failure = failure if isinstance(failure, str) else (failure, headers or {})

    def file_downloads(self) -> list[str]:
        """The files whose bytes were sent (GET of a file, not HEAD)."""
        marker = f"/{self.repo_id}/resolve/"
        return [path.split(marker, 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and marker in path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the test reads hub.requests instead
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, self.path))
                if hub.failure == "disconnect":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if hub.failure is not None:
                    status, headers = hub.failure
                    self._send(status, b'{"error": "failing on purpose"}', {"Content-Type": "application/json",
                                                                             **headers}, body)
                    return
                api = f"/api/models/{hub.repo_id}/"
                resolve = f"/{hub.repo_id}/resolve/"
                if path.startswith(api + "revision/"):
                    info = {"id": hub.repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in hub.files]}
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                elif path.startswith(api + "tree/"):
                    tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in hub.files.items()]
                    self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                elif path.startswith(resolve) and path.split(resolve, 1)[1].split("/", 1)[-1] in hub.files:
                    data = hub.files[path.split(resolve, 1)[1].split("/", 1)[1]]
                    self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                           "Content-Type": "application/octet-stream"}, body)
                else:
                    self._send(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, body)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
