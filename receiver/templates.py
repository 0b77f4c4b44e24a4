"""Status templates: the placeholders a context or target URL may use, rendering, presets,
and reading a rendered context back (which cluster and kind it names). Pure.

Below every part: the configuration validates templates with these rules, the status part
renders with them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TARGET_URL_FIELDS = frozenset({"cluster", "kind", "namespace", "name", "sha", "repo", "owner",
                               "host", "uid8"})
# A context names the object, never the commit: Gitea keeps one latest status per context.
CONTEXT_FIELDS = TARGET_URL_FIELDS - {"sha"}


def template_fields(template: str) -> set[str]:
    """The placeholder names a template uses; ValueError if it is malformed."""
    names: set[str] = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None:
            if not name.isidentifier() or spec or conversion:
                raise ValueError(f"unsupported placeholder {{{name}}} in {template!r}")
            names.add(name)
    return names


def check_template(template: str, allowed: frozenset[str]) -> str | None:
    """An error message for a template with unknown or malformed placeholders, else None."""
    try:
        unknown = template_fields(template) - allowed
    except ValueError as exc:
        return str(exc)
    if unknown:
        return f"unknown placeholder(s) {sorted(unknown)} in {template!r}; use {sorted(allowed)}"
    return None


class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill a template; never raises (an unknown placeholder stays as written)."""
    try:
        return template.format_map(_Keep(values))
    except (ValueError, IndexError, AttributeError, KeyError):
        return template


@dataclass(frozen=True, slots=True)
class StatusTemplates:
    cluster: str
    context: str = "flux/{cluster}/{kind}/{namespace}/{name}"
    target_url: str = ""
    # `{uid8}`: the first segment of a Provider's UID (`statuses.provider_uid`), as
    # notification-controller's gitea Provider puts it in its contexts.
    uid8: str = ""
    # notification-controller lower-cases its whole context.
    lower: bool = False


# Context presets (`statuses.context_preset`): template and whether it is lower-cased.
CONTEXT_PRESETS: dict[str, tuple[str, bool]] = {
    # notification-controller's generateDefaultCommitStatus: kind/name/<provider uid segment 1>.
    "notification-controller": ("{kind}/{name}/{uid8}", True),
}


def uid_prefix(uid: str) -> str:
    """The first dash-separated segment of a Kubernetes UID, lower-cased."""
    return uid.strip().split("-", 1)[0].lower()


class FleetTemplateError(ValueError):
    """The context template cannot tell which cluster a status belongs to, or whether it is a
    deploy's."""


def cluster_parser(template: str, clusters: Sequence[str], *,
                   require_kind: bool = True) -> re.Pattern[str]:
    """A pattern that matches the contexts `template` renders for the expected `clusters`;
    group `cluster` names the cluster and group `kind` the object's kind. FleetTemplateError if
    the template has no `{cluster}` or no `{kind}`.

    The cluster field matches only the expected names (longest first), so a name containing
    the template's separators is still read whole; every other field matches any non-empty
    text, and a field used twice must repeat its first value. Without `require_kind` a
    template with no `{kind}` is accepted (a canary's context: one kind, always deploying).
    """
    parts: list[str] = []
    used: set[str] = set()
    names = "|".join(re.escape(c) for c in sorted(set(clusters), key=lambda c: (-len(c), c)))
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in used:
            parts.append(f"(?P={field})")
            continue
        used.add(field)
        parts.append(f"(?P<{field}>{names})" if field == "cluster" else f"(?P<{field}>.+?)")
    if "cluster" not in used:
        raise FleetTemplateError(
            f"context template {template!r} has no {{cluster}} placeholder, so the fleet status "
            "cannot tell which cluster a status belongs to: add {cluster} to "
            "statuses.context_template, or turn statuses.fleet off")
    if "kind" not in used and require_kind:
        raise FleetTemplateError(
            f"context template {template!r} has no {{kind}} placeholder, so the fleet status "
            "cannot tell a deploy (Kustomization, HelmRelease) from a fetched source: add "
            "{kind} to statuses.context_template, or turn statuses.fleet off")
    return re.compile("".join(parts), re.DOTALL)
