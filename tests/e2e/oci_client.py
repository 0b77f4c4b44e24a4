"""A small OCI distribution client for the end-to-end tests: push a Flux artifact to a registry
the way `flux push artifact` lays it out, over plain HTTP on loopback.

The registry protocol (OCI distribution spec, as Gitea's container registry serves it):

- `GET /v2/` answers 401 with `WWW-Authenticate: Bearer realm="<url>",service="<name>",...`;
  the realm (Gitea: `<ROOT_URL>v2/token`) gives a bearer token for basic credentials
  (`{"token": ...}`), sent on every later request as `Authorization: Bearer <token>`.
- A blob: `POST /v2/<name>/blobs/uploads/` (202, `Location` of the upload session), then
  `PUT <location>?digest=sha256:<hex>` with the bytes (201).
- A manifest: `PUT /v2/<name>/manifests/<tag>` with its media type as `Content-Type` (201,
  `Docker-Content-Digest`).

The artifact (fluxcd/pkg `oci`: the media types and annotation keys `flux push artifact`
writes): an OCI image manifest whose config has media type
`application/vnd.cncf.flux.config.v1+json`, one layer `application/vnd.cncf.flux.content.v1.tar+gzip`
(a tar.gz of the directory's files, paths relative to it), and the annotations
`org.opencontainers.image.source`, `org.opencontainers.image.revision` and
`org.opencontainers.image.created`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin

import httpx

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
FLUX_CONFIG_TYPE = "application/vnd.cncf.flux.config.v1+json"
FLUX_CONTENT_TYPE = "application/vnd.cncf.flux.content.v1.tar+gzip"
SOURCE_ANNOTATION = "org.opencontainers.image.source"
REVISION_ANNOTATION = "org.opencontainers.image.revision"
CREATED_ANNOTATION = "org.opencontainers.image.created"

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """The registry answered something the protocol does not allow here."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_gz(files: Mapping[str, str]) -> bytes:
    """A reproducible tar.gz of text files (relative paths), as a directory's content."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            data = files[path].encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass(frozen=True)
class Pushed:
    """A pushed manifest: its digest, its tag and the manifest itself."""

    digest: str
    tag: str
    manifest: dict[str, Any]


@dataclass
class OCIClient:
    """Bearer-token registry client for one registry (`base_url`: `http://host:port`); with
    an empty `username`, the token is asked for anonymously."""

    base_url: str
    username: str
    password: str
    timeout: float = 30.0
    _tokens: dict[str, str] = field(default_factory=dict, repr=False)

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, trust_env=False, timeout=self.timeout)

    def challenge(self) -> dict[str, str]:
        """The parameters of the registry's Bearer challenge (`realm`, `service`, ...)."""
        with self._client() as client:
            response = client.get("/v2/")
        header = response.headers.get("www-authenticate", "")
        if response.status_code != 401 or not header.lower().startswith("bearer "):
            raise RegistryError(f"GET /v2/: HTTP {response.status_code}, "
                                f"WWW-Authenticate {header!r}: no Bearer challenge")
        params = dict(_CHALLENGE_PARAM.findall(header))
        if "realm" not in params:
            raise RegistryError(f"Bearer challenge without a realm: {header!r}")
        return params

    def token(self, repository: str) -> str:
        """A bearer token for pull and push on `repository` (`<owner>/<name>`)."""
        if repository not in self._tokens:
            params = self.challenge()
            query = {"scope": f"repository:{repository}:pull,push"}
            if "service" in params:
                query["service"] = params["service"]
            with httpx.Client(trust_env=False, timeout=self.timeout) as client:
                response = client.get(params["realm"], params=query, auth=(
                    (self.username, self.password) if self.username else None))
            if response.status_code != 200:
                raise RegistryError(f"token from {params['realm']}: HTTP "
                                    f"{response.status_code}: {response.text[:500]}")
            body = response.json()
            token = body.get("token") or body.get("access_token")
            if not isinstance(token, str) or not token:
                raise RegistryError(f"token reply without a token: {body!r}")
            self._tokens[repository] = token
        return self._tokens[repository]

    def _auth(self, repository: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(repository)}"}

    def push_blob(self, repository: str, data: bytes, media_type: str) -> dict[str, Any]:
        """Upload a blob (POST a session, PUT the bytes with their digest); its descriptor."""
        digest = sha256_digest(data)
        headers = self._auth(repository)
        with self._client() as client:
            started = client.post(f"/v2/{repository}/blobs/uploads/", headers=headers)
            location = started.headers.get("location", "")
            if started.status_code != 202 or not location:
                raise RegistryError(f"blob upload to {repository}: HTTP {started.status_code}: "
                                    f"{started.text[:500]}")
            url = urljoin(f"{self.base_url}/v2/{repository}/blobs/uploads/", location)
            done = client.put(url, params={"digest": digest}, content=data,
                              headers={**headers, "Content-Type": "application/octet-stream"})
            if done.status_code != 201:
                raise RegistryError(f"blob {digest} to {repository}: HTTP {done.status_code}: "
                                    f"{done.text[:500]}")
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def push_manifest(self, repository: str, tag: str, manifest: Mapping[str, Any]) -> str:
        """PUT an OCI image manifest under `tag`; the digest the registry names."""
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        with self._client() as client:
            response = client.put(f"/v2/{repository}/manifests/{tag}", content=body, headers={
                **self._auth(repository), "Content-Type": MANIFEST_TYPE})
        if response.status_code != 201:
            raise RegistryError(f"manifest {repository}:{tag}: HTTP {response.status_code}: "
                                f"{response.text[:500]}")
        digest = response.headers.get("docker-content-digest") or sha256_digest(body)
        if digest != sha256_digest(body):
            raise RegistryError(f"the registry named {digest}, the manifest is "
                                f"{sha256_digest(body)}")
        return digest

    def manifest(self, repository: str, reference: str) -> dict[str, Any]:
        with self._client() as client:
            response = client.get(f"/v2/{repository}/manifests/{reference}", headers={
                **self._auth(repository), "Accept": MANIFEST_TYPE})
        if response.status_code != 200:
            raise RegistryError(f"GET manifest {repository}:{reference}: HTTP "
                                f"{response.status_code}: {response.text[:500]}")
        found: dict[str, Any] = response.json()
        return found

    def push_flux_artifact(self, repository: str, tag: str, files: Mapping[str, str], *,
                           source: str, revision: str, created: datetime | None = None,
                           annotations: Mapping[str, str] | None = None) -> Pushed:
        """`flux push artifact oci://<registry>/<repository>:<tag> --source --revision` of a
        directory holding `files`: config and content blobs, then the annotated manifest."""
        when = (created or datetime.now(UTC)).astimezone(UTC)
        config = self.push_blob(repository, b"{}", FLUX_CONFIG_TYPE)
        layer = self.push_blob(repository, tar_gz(files), FLUX_CONTENT_TYPE)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": config,
            "layers": [layer],
            "annotations": {
                CREATED_ANNOTATION: when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                SOURCE_ANNOTATION: source,
                REVISION_ANNOTATION: revision,
                **(annotations or {}),
            },
        }
        return Pushed(self.push_manifest(repository, tag, manifest), tag, manifest)
