"""Why a push matched no source at all. Pure.

A push whose repository no GitRepository uses is answered 202 with no targets, like any other:
the Receiver may serve many repositories. But the same reply comes when a host alias is missing
or a GitRepository points at another Gitea, and then the push silently does nothing. So the
reply and a metric say which of three cases it is:

- `host_alias_missing`: a GitRepository uses the same repository path on another host, e.g. an
  in-cluster Service address (`gitea-http.gitea:3000/org/app`) for a push from
  `gitea.example.com/org/app`: `host_aliases` should map one host to the other;
- `other_repository`: GitRepositories use the pushed host, but none this repository;
- `other_host`: no GitRepository uses the pushed host (after aliases), nor this repository's
  path on any host: a push from a Gitea these Flux objects do not pull from.

Only the push's URLs and the store's URL indexes are read: the cost does not grow with the
number of objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push

HOST_ALIAS_MISSING = "host_alias_missing"
OTHER_REPOSITORY = "other_repository"
OTHER_HOST = "other_host"
REASONS = (HOST_ALIAS_MISSING, OTHER_REPOSITORY, OTHER_HOST)


@dataclass(frozen=True, slots=True)
class Unmatched:
    reason: str  # one of REASONS
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


def unmatched(push: Push | None, store: ObjectStore) -> Unmatched | None:
    """None when the push names no repository (an Actions call without one) or when some
    GitRepository uses its repository (whatever its ref: that one is reported as skipped)."""
    if push is None:
        return None
    urls = [u for u in (store.normalise_url(url) for url in push.repo_urls) if u]
    if not urls:
        return None
    if any(store.sources_for_url(url) for url in urls):
        return None
    for url in urls:
        hosts = store.hosts_serving(url)
        if hosts:
            host = url.partition("/")[0]
            others = ", ".join(hosts)
            return Unmatched(
                HOST_ALIAS_MISSING,
                f"no GitRepository uses {url}, but the same repository path is used on "
                f"{others}: if that is the same Gitea, map {host} to it in host_aliases")
    for url in urls:
        host = url.partition("/")[0]
        if store.has_source_host(host):
            return Unmatched(
                OTHER_REPOSITORY,
                f"no GitRepository uses {url}; GitRepositories on {host} use other repositories")
    hosts = sorted({url.partition("/")[0] for url in urls})
    return Unmatched(
        OTHER_HOST,
        f"no GitRepository uses a repository on {', '.join(hosts)} (after host_aliases): "
        "the push comes from a Gitea these Flux objects do not pull from, or an alias is missing")
