"""Which repository a status goes to (an object's Git source URL, or the one an OCI artifact
names), and which configured Gitea instances host it. Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from receiver.flux.objects import CONSUMER_KINDS, FluxObject
from receiver.flux.origin import artifact_commit, is_oci, source_url
from receiver.flux.revisions import applied_revision, commit_of


@dataclass(frozen=True, slots=True)
class RepoRef:
    key: str  # normalised host[:port][/sub-path]/owner/repo
    host: str
    owner: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


def repo_ref(normalised: str | None) -> RepoRef | None:
    """Split a normalised repository key; the last two path segments are owner and name."""
    if not normalised:
        return None
    parts = normalised.strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        return None
    return RepoRef(normalised, parts[0], parts[-2], parts[-1])


Normaliser = Callable[[str], "str | None"]


def git_source_of(obj: FluxObject, source: FluxObject | None) -> FluxObject | None:
    """The GitRepository whose URL names the object's repository, if it has one."""
    if obj.kind == "GitRepository":
        return obj
    if obj.kind in CONSUMER_KINDS and source is not None and source.kind == "GitRepository":
        return source
    return None


def repo_of(obj: FluxObject, source: FluxObject | None, normalise: Normaliser) -> RepoRef | None:
    """The Gitea repository an object's statuses go to: its GitRepository's URL, or for a
    consumer of an OCIRepository the Git URL its artifact names (`origin.source_url`)."""
    git = git_source_of(obj, source)
    if git is not None:
        url = git.spec.get("url")
    elif obj.kind in CONSUMER_KINDS and source is not None and is_oci(source):
        url = source_url(source)
    else:
        return None
    return repo_ref(normalise(url)) if isinstance(url, str) and url else None


def source_commit(source: FluxObject | None) -> str | None:
    """The commit a source's current artifact holds (Git) or was built from (OCI)."""
    if source is None:
        return None
    return artifact_commit(source) if is_oci(source) else commit_of(applied_revision(source))


def instance_hosts(
    instances: Iterable[tuple[str, str, Iterable[str]]], host_key: Callable[[str], str]
) -> dict[str, tuple[str, ...]]:
    """(name, url, hosts) per instance -> {normalised repository host: instance names}.

    An instance serves the hosts it lists, or else the host of its own URL.
    """
    table: dict[str, list[str]] = {}
    for name, url, hosts in instances:
        served = [h for h in hosts if h] or [url.split("://", 1)[-1].split("/", 1)[0]]
        for host in served:
            names = table.setdefault(host_key(host), [])
            if name not in names:
                names.append(name)
    return {host: tuple(names) for host, names in table.items()}


def instances_for(repo_key: str, table: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Every instance that hosts the repository: mirrors in several regions all get it."""
    return table.get(repo_key.split("/", 1)[0], ())
