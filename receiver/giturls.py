"""Git repository URL normalisation, to match a Gitea push to Flux GitRepositories. Pure.

A Gitea push names its repository three ways (`clone_url`, `html_url`, `ssh_url`) and a
GitRepository's `spec.url` may use any of them, or an in-cluster Service address. All are
reduced to one key, `host[:port]/path` in lower case, so matching is a string comparison:

* the scheme and any user info (`git@`, `user:pass@`) are dropped, so the https and ssh
  URLs of one repository agree;
* the scheme's default port is dropped (443 https, 80 http, 22 ssh, 9418 git); any other
  port stays, so ssh on a custom port (`ssh://git@host:2222/o/r`) only matches its https
  twin through a host alias (`{"host:2222": "host"}`);
* the path is lower-cased (Gitea owner and repository names are case-insensitive), loses
  its query, fragment, empty segments and `.git` suffix, and keeps any sub-path Gitea is
  served under (`https://x/gitea/org/repo` → `x/gitea/org/repo`).

Only printable ASCII is accepted: Gitea names are ASCII, and refusing the rest keeps
lower-casing well-behaved (some non-ASCII letters change length or meaning when it is).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PORTS",
    "gitea_prefixes",
    "normalise_aliases",
    "normalise_host",
    "normalise_oci_url",
    "normalise_repo_url",
    "registry_host",
    "repo_base",
    "repo_full_name",
]

DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
# Spellings git itself accepts for ssh.
_SCHEME_ALIASES = {"git+ssh": "ssh", "ssh+git": "ssh"}

_SCHEME_URL_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>.*)")
# scp-like `[user@]host:path`: the first ':' comes before any '/', and there is no scheme.
_SCP_RE = re.compile(r"(?:(?P<user>[^@:/\[\]]+)@)?(?P<host>\[[^\]/]*\]|[^@:/\[\]]+):(?P<path>.*)")
_HOST_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")
_KNOWN_SCHEMES = frozenset({*DEFAULT_PORTS, *_SCHEME_ALIASES, "file"})


@dataclass(frozen=True, slots=True)
class _Parts:
    scheme: str  # "" for the scp-like form
    host: str  # lower case, brackets kept around IPv6 literals
    port: int | None  # None when absent
    segments: tuple[str, ...]  # case as given, `.git` removed from the last one


def _split_hostport(hostport: str) -> tuple[str, int | None] | None:
    """`Host.:0443` → ('host', 443); None unless it is a plausible host and port."""
    if hostport.startswith("["):  # IPv6 literal: its colons are not the port separator
        end = hostport.find("]") + 1
        host, rest = hostport[:end], hostport[end:]
        if not end or rest[:1] not in ("", ":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = hostport.partition(":")
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host  # `example.com.` is `example.com`
    if not _HOST_RE.fullmatch(host):
        return None
    if not port_text:
        return host, None
    digits = port_text.lstrip("0")
    if not port_text.isdigit() or len(digits) > 5 or not 0 < int(digits or "0") <= 65535:
        return None
    return host, int(digits)


def _join_hostport(host: str, port: int | None, defaults: set[int]) -> str:
    return host if port is None or port in defaults else f"{host}:{port}"


def _default_ports(scheme: str) -> set[int]:
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    return {DEFAULT_PORTS[scheme]} if scheme in DEFAULT_PORTS else set()


def normalise_host(hostport: str, scheme: str = "") -> str:
    """Lower-case `[user@]host[:port]` and drop a default port.

    With a scheme only that scheme's default port is dropped; without one (alias tables)
    every default port in DEFAULT_PORTS is, since the alias may serve any scheme. Input that
    is not a host is returned stripped and lower-cased, so it simply never matches.
    """
    text = hostport.strip().rpartition("@")[2]
    parsed = _split_hostport(text)
    if parsed is None:
        return text.lower()
    defaults = _default_ports(scheme) if scheme else set(DEFAULT_PORTS.values())
    return _join_hostport(*parsed, defaults)


def normalise_aliases(aliases: Mapping[str, str]) -> dict[str, str]:
    """Alias table with both sides normalised; worth caching when it is used a lot."""
    return {normalise_host(alias): normalise_host(target) for alias, target in aliases.items()}


def _path_segments(path: str) -> tuple[str, ...] | None:
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    segments = [s for s in path.split("/") if s]
    # Strip `.git` until none is left: Gitea forbids names ending in it, and stopping after
    # one would make `r.git.git` normalise differently on a second pass.
    while segments and segments[-1].lower().endswith(".git"):
        segments[-1] = segments[-1][: -len(".git")]
        if not segments[-1]:
            return None
    return tuple(segments) or None


def _parse(url: str) -> _Parts | None:
    text = url.strip()
    if not text or not all("!" <= ch <= "~" for ch in text):
        return None
    if m := _SCHEME_URL_RE.fullmatch(text):
        scheme = m["scheme"].lower()
        scheme = _SCHEME_ALIASES.get(scheme, scheme)
        if scheme not in DEFAULT_PORTS:
            return None
        hostport = _split_hostport(m["authority"].rpartition("@")[2])
    elif m := _SCP_RE.fullmatch(text):
        scheme = ""
        # `C:/x` is a Windows path and `https:/x` a typo, not hosts named `c` or `https`.
        drive = len(m["host"]) == 1 and m["path"][:1] in ("/", "\\")
        if drive or (m["user"] is None and m["host"].lower() in _KNOWN_SCHEMES):
            return None
        hostport = _split_hostport(m["host"])  # no port in this form: `:` starts the path
    else:
        return None
    segments = _path_segments(m["path"])
    if hostport is None or segments is None:
        return None
    return _Parts(scheme, *hostport, segments)


def normalise_repo_url(url: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """Canonical key `host[:port]/path` for a repository URL, or None if it is not one.

    `aliases` maps an alias host[:port] to its canonical host[:port] (both normalised
    first). It is applied once, after the URL's own host is normalised, and is not
    transitive.
    """
    parts = _parse(url)
    if parts is None:
        return None
    hostport = _join_hostport(parts.host, parts.port, _default_ports(parts.scheme))
    if aliases:
        hostport = normalise_aliases(aliases).get(hostport, hostport)
    return f"{hostport}/{'/'.join(parts.segments)}".lower()


def repo_full_name(url: str) -> str | None:
    """`owner/repo` from the last two path segments, case as given, `.git` removed."""
    parts = _parse(url)
    if parts is None or len(parts.segments) < 2:
        return None
    return "/".join(parts.segments[-2:])


def repo_base(url: str) -> str | None:
    """`scheme://host[:port][/sub-path]` of an http(s) repository URL, for the Gitea API.

    User info is dropped (it must not end up in logs or API calls); the sub-path keeps its
    case because the reverse proxy in front of Gitea may care.
    """
    parts = _parse(url)
    if parts is None or parts.scheme not in ("http", "https") or len(parts.segments) < 2:
        return None
    hostport = _join_hostport(parts.host, parts.port, _default_ports(parts.scheme))
    return f"{parts.scheme}://{hostport}" + "".join(f"/{s}" for s in parts.segments[:-2])


def gitea_prefixes(
    urls: Iterable[str], hosts: Iterable[str], aliases: Mapping[str, str] | None = None
) -> frozenset[str]:
    """Where repositories live on the configured Gitea instances, as normalised keys before
    `owner/name`: `host[:port][/sub-path]`, lower case, aliases applied on both sides.

    `urls` are instance URLs (their path is the sub-path Gitea is served under), `hosts` the
    repository hosts they serve; every alias and its target count as hosts too, so an
    in-cluster Service address names the same repositories as the public one.
    """
    table = normalise_aliases(aliases or {})
    found: set[str] = set()
    for url in urls:
        m = _SCHEME_URL_RE.fullmatch(url.strip())
        if m is None:
            continue
        host = normalise_host(m["authority"], m["scheme"])
        sub_path = "/".join(s for s in m["path"].split("/") if s)
        found.add(table.get(host, host) + (f"/{sub_path}" if sub_path else ""))
    for host in (*hosts, *table, *table.values()):
        normalised = normalise_host(host)
        found.add(table.get(normalised, normalised))
    return frozenset(p.lower() for p in found if p)


# An `oci://` URL names a registry host and a repository path; OCI clients speak https (443).
_OCI_DEFAULT_PORTS = {443}


def normalise_oci_url(url: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """Canonical key `host[:port]/path` for an `oci://` URL (OCIRepository, HelmRepository
    of type oci), or None if it is not one: host lower case with host aliases applied as for
    Git URLs, port 443 dropped, path lower case (Gitea lower-cases image names) without empty
    segments, so a trailing slash does not matter. A tag or digest is not part of the key."""
    text = url.strip()
    if text[:6].lower() != "oci://" or not all("!" <= ch <= "~" for ch in text):
        return None
    authority, _, path = text[6:].partition("/")
    hostport = _split_hostport(authority)
    segments = [s for s in re.split(r"[?#]", path, maxsplit=1)[0].split("/") if s]
    if hostport is None or not segments:
        return None
    host = _join_hostport(*hostport, _OCI_DEFAULT_PORTS)
    if aliases:
        host = normalise_aliases(aliases).get(host, host)
    return f"{host}/{'/'.join(segments)}".lower()


def registry_host(instance_url: str) -> str | None:
    """`host[:port]` of the container registry of a Gitea instance (`scheme://host[/sub]`):
    Gitea serves `/v2/` on its own host, whatever sub-path its web UI has."""
    m = _SCHEME_URL_RE.fullmatch(instance_url.strip())
    if m is None or m["scheme"].lower() not in ("http", "https"):
        return None
    parsed = _split_hostport(m["authority"].rpartition("@")[2])
    if parsed is None:
        return None
    return _join_hostport(*parsed, _default_ports(m["scheme"]))
