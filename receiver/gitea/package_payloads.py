"""What a Gitea `package` event says (a package version created or deleted), read as defensively
as a push (`gitea.payloads`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.gitea.payloads import (
    MAX_FULL_NAME_BYTES,
    MAX_URL_BYTES,
    PayloadError,
    as_object,
    as_text,
    checked,
)

PACKAGE_ACTIONS = frozenset({"created", "deleted"})
# Gitea package names: a container image path may nest (`team/app`); at most 255 bytes.
MAX_PACKAGE_NAME_BYTES = 256
# A version: a tag (<= 128 characters in OCI) or `sha256:<64 hex>`; other types are longer.
MAX_VERSION_BYTES = 256
_PACKAGE_HTML = "/-/packages/"


@dataclass(frozen=True, slots=True)
class PackagePush:
    """A Gitea `package` event (`X-Gitea-Event: package`), reduced to what routing needs.

    `instance` is the Gitea instance URL (`scheme://host[:port][/sub-path]`), read from the
    package's `html_url` (`<instance>/<owner>/-/packages/<type>/<name>/<version>`) or else the
    owner's or sender's profile URL; the registry is served on that host (Gitea sends no
    repository: it is null for package events).
    """

    action: str  # created | deleted
    type: str  # container, helm, ... (lower case)
    owner: str  # the package owner's login, lower case
    name: str  # lower case for containers; may contain `/`
    version: str  # a tag, or `sha256:<hex>` for a manifest pushed by digest
    instance: str  # "" when the payload names none

    @property
    def deleted(self) -> bool:
        return self.action == "deleted"

    @property
    def by_digest(self) -> bool:
        return self.version.startswith("sha256:")

    @property
    def label(self) -> str:
        return f"{self.type} package {self.owner}/{self.name}:{self.version}"


def _instance_of(html_url: str, marker: str) -> str:
    """The part of `html_url` before `marker` and the owner segment before it."""
    head, found, _ = html_url.partition(marker)
    if not found:
        return ""
    base, slash, _owner = head.rstrip("/").rpartition("/")
    return base if slash and "://" in base else ""


def _profile_base(html_url: str) -> str:
    base, slash, _login = html_url.rstrip("/").rpartition("/")
    return base if slash and "://" in base and base.partition("://")[2] else ""


def parse_gitea_package(doc: Any) -> PackagePush:
    """A Gitea `package` webhook payload (JSON already decoded). PayloadError when a field
    routing needs is missing or garbled."""
    if not isinstance(doc, dict):
        raise PayloadError("payload must be a JSON object")
    action = as_text(doc.get("action")).lower()
    if action not in PACKAGE_ACTIONS:
        raise PayloadError("package event action must be created or deleted")
    package = as_object(doc.get("package"))
    kind = checked(as_text(package.get("type")).lower(), "package.type", 64)
    name = checked(as_text(package.get("name")), "package.name", MAX_PACKAGE_NAME_BYTES)
    version = checked(as_text(package.get("version")), "package.version", MAX_VERSION_BYTES)
    owner_obj = as_object(package.get("owner"))
    owner = checked(as_text(owner_obj.get("login")) or as_text(owner_obj.get("username")),
                    "package.owner.login", MAX_FULL_NAME_BYTES)
    for label, value in (("type", kind), ("name", name), ("version", version),
                         ("owner.login", owner)):
        if not value:
            raise PayloadError(f"package event has no package.{label}")
    html = checked(as_text(package.get("html_url")), "package.html_url", MAX_URL_BYTES)
    instance = _instance_of(html, _PACKAGE_HTML)
    for who in (owner_obj, as_object(doc.get("sender"))):
        if instance:
            break
        instance = _profile_base(
            checked(as_text(who.get("html_url")), "html_url", MAX_URL_BYTES))
    if not instance:
        raise PayloadError("package event names no Gitea instance: package.html_url, "
                           "package.owner.html_url or sender.html_url is needed")
    return PackagePush(action, kind, owner.lower(),
                       name.lower() if kind == "container" else name, version.lower()
                       if kind == "container" else version, instance)
