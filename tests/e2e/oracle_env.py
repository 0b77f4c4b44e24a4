"""What the Flux oracle module (`tests/e2e/test_e2e_flux_oracle.py`) measures with, besides the peers.

- `WebhookCapture`: an HTTP server on loopback that Gitea's repository webhooks point at. It
  records each delivery as Gitea sent it (headers and raw body), so the oracle sends Gitea's own
  bytes and signatures, unchanged or with one thing changed, to notification-controller and to
  the bridge.
- `AuditTail`: reads the API server's audit log from a byte offset and says who PATCHed which
  Flux object (by the client's user agent): how a request's effects are counted from the API
  server itself, not from HTTP answers.
- `commit_files`: the files a commit changed, as Gitea reports them (what a "your push did not
  touch this path" explanation is checked against).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.e2e.e2e_harness import Gitea

# Audit `objectRef.resource` -> kind, for the kinds the oracle lists in its Receivers.
KIND_OF = {"gitrepositories": "GitRepository", "kustomizations": "Kustomization"}
# User agents by prefix: controller-runtime names a controller by its binary; the bridge's
# Kubernetes client (the official Python client) by its generator.
ACTORS = (("notification-controller/", "notification-controller"),
          ("source-controller/", "source-controller"),
          ("kustomize-controller/", "kustomize-controller"),
          ("OpenAPI-Generator/", "bridge"))


# -- Gitea's webhooks, as sent ---------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """One webhook delivery as Gitea sent it: header names lower-cased, the raw body."""

    headers: dict[str, str]
    body: bytes

    @property
    def delivery(self) -> str:
        return self.headers.get("x-gitea-delivery", "")

    def sent_headers(self, drop: Iterable[str] = (), **override: str) -> dict[str, str]:
        """The headers to send it again with: Gitea's own, less the transport ones and `drop`,
        with `override` (underscores in names become dashes)."""
        skip = {"host", "content-length", "connection", "accept-encoding", *drop}
        out = {k: v for k, v in self.headers.items() if k not in skip}
        out.update({k.replace("_", "-").lower(): v for k, v in override.items()})
        return out


class WebhookCapture:
    """Records every webhook Gitea delivers to it; `wait` returns the one for a commit."""

    def __init__(self) -> None:
        self._seen: list[Captured] = []
        self._changed = threading.Condition()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with capture._changed:
                    capture._seen.append(Captured(headers, body))
                    capture._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return  # Gitea's deliveries are the test's business, not stderr's

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def wait(self, sha: str, timeout: float = 60.0) -> Captured:
        """The push delivery whose `after` is `sha`, once Gitea has sent it."""
        def found() -> Captured | None:
            for item in self._seen:
                try:
                    doc = json.loads(item.body)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("after") == sha:
                    return item
            return None

        with self._changed:
            got = self._changed.wait_for(found, timeout)
        if got is None:
            raise AssertionError(f"Gitea sent no push webhook for {sha} within {timeout:g}s "
                                 f"({len(self._seen)} deliveries captured)")
        return got

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def commit_files(gitea: Gitea, owner: str, repo: str, sha: str) -> frozenset[str]:
    """The paths commit `sha` changed (added, modified, removed), as Gitea reports them."""
    found = gitea.api("GET", f"/repos/{owner}/{repo}/git/commits/{sha}",
                      params={"stat": "false", "files": "true", "verification": "false"})
    files = found.get("files") if isinstance(found, dict) else None
    if not isinstance(files, list):
        raise AssertionError(f"Gitea reported no file list for {owner}/{repo}@{sha}: {found}")
    return frozenset(str(f["filename"]) for f in files if isinstance(f, dict))


# -- the audit log ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One PATCH of a Flux object itself (not its status) that the API server answered."""

    actor: str  # notification-controller, bridge, ... (from the user agent)
    namespace: str
    kind: str
    name: str
    code: int

    @property
    def object(self) -> str:
        return f"{self.kind}/{self.name}"


def actor_of(user_agent: str) -> str:
    for prefix, actor in ACTORS:
        if user_agent.startswith(prefix):
            return actor
    return user_agent.split("/", 1)[0] or "?"


class AuditTail:
    """The API server's audit log (blocking mode: an event is written before the request is
    answered), read from a byte offset: what was patched since a point in time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def patches(self, start: int, namespaces: Iterable[str]) -> list[Patch]:
        """Successful PATCHes of listed kinds' objects in `namespaces` written after `start`."""
        wanted = set(namespaces)
        try:
            with self.path.open("rb") as log:
                log.seek(start)
                data = log.read()
        except FileNotFoundError:
            return []
        found = []
        for line in data.split(b"\n"):
            try:
                event = json.loads(line)
            except ValueError:  # empty, or the line being written
                continue
            ref = event.get("objectRef") or {}
            code = int((event.get("responseStatus") or {}).get("code") or 0)
            if (event.get("stage") != "ResponseComplete" or event.get("verb") != "patch"
                    or ref.get("subresource") or ref.get("namespace") not in wanted
                    or ref.get("resource") not in KIND_OF or not 200 <= code < 300):
                continue
            found.append(Patch(actor_of(str(event.get("userAgent") or "")), ref["namespace"],
                               KIND_OF[ref["resource"]], str(ref.get("name")), code))
        return found
