"""A small Hugging Face Hub stand-in on 127.0.0.1 (standard library only), for tests of pushing and loading.

It implements the endpoints the real ``huggingface_hub`` client uses to create a repo, upload files inline
(preupload answers ``uploadMode: "regular"``) and commit them (NDJSON), validate card YAML, and download
(``HEAD``/``GET /{repo}/resolve/{revision}/{path}``); anything else is a 404. Like the real Hub, it rejects a
commit whose ``README.md`` metadata has a ``base_model`` that is not a Hub model id ("Invalid metadata in README.md").
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def card_metadata(readme: str) -> dict:
    if not readme.startswith("---"):
        return {}
    return yaml.safe_load(readme.split("---", 2)[1]) or {}


def metadata_error(readme: str) -> str | None:
    base_models = card_metadata(readme).get("base_model")
    for value in base_models if isinstance(base_models, list) else [base_models]:
        if value is not None and not (isinstance(value, str) and _REPO_ID.match(value)):
            return f'Invalid metadata in README.md.\n- "base_model" with value "{value}" is not valid.'
    return None


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[str]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, json_body=None):
                if json_body is not None:
                    body = json.dumps(json_body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                path = urlparse(self.path).path
                hub.requests.append(f"POST {path}")
                if path == "/api/repos/create":
                    data = json.loads(self._body())
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    if repo_id in hub.repos:
                        return self._send(
                            409,
                            json_body={"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                        )
                    hub.repos[repo_id], hub.commits[repo_id] = {}, []
                    return self._send(200, json_body={"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    error = metadata_error(json.loads(self._body()).get("content", ""))
                    return self._send(400 if error else 200, json_body={"error": error} if error else {})
                match = re.match(r"^/api/models/(.+)/(preupload|commit)/([^/]+)$", path)
                if match and match.group(1) in hub.repos:
                    repo_id, action = match.group(1), match.group(2)
                    if action == "preupload":
                        files = json.loads(self._body())["files"]
                        return self._send(
                            200,
                            json_body={
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    files = dict(hub.repos[repo_id])
                    for line in self._body().decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] in ("deletedFile", "deletedFolder"):
                            files.pop(item["value"]["path"], None)
                    error = metadata_error(files.get("README.md", b"").decode())
                    if error:
                        return self._send(400, json_body={"error": error}, headers={"X-Error-Message": error})
                    hub.repos[repo_id] = files
                    sha = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(hub.commits[repo_id])).encode())
                    hub.commits[repo_id].append(sha.hexdigest())
                    return self._send(
                        200,
                        json_body={
                            "commitUrl": f"{hub.url}/{repo_id}/commit/{sha.hexdigest()}",
                            "commitOid": sha.hexdigest(),
                            "pullRequestUrl": None,
                        },
                    )
                return self._send(404, json_body={"error": "Not found"})

            def _resolve(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                match = re.match(r"^/(.+)/resolve/([^/]+)/(.+)$", path)
                if not match or match.group(1) not in hub.repos:
                    return self._send(404, headers={"X-Error-Code": "RepoNotFound"}, json_body={"error": "Not found"})
                content = hub.repos[match.group(1)].get(match.group(3))
                if content is None:
                    return self._send(
                        404, headers={"X-Error-Code": "EntryNotFound"}, json_body={"error": "Entry not found"}
                    )
                etag = hashlib.sha256(content).hexdigest()
                commit = (hub.commits[match.group(1)] or ["0" * 40])[-1]
                return self._send(
                    200,
                    content,
                    headers={"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Content-Type": "application/octet-stream"},
                )

            do_GET = _resolve
            do_HEAD = _resolve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
