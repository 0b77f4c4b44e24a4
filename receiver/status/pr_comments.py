"""The pull-request comments the bridge keeps: what each says, how one is found again, and what
to do to Gitea to make it say so. Pure.

One preview comment per pull request and cluster lists every preview object with its state,
the commit it runs, its preview URL and a link to the commit's statuses; once the objects are
gone it says the preview was torn down. One deployment comment per merged pull request and
cluster gets a line per object that deployed the merge commit. Each starts with an HTML
marker naming its kind and cluster, so any replica, after any restart, finds it among the
pull request's comments (only among those the bridge's own Gitea user posted). When two
carry the same marker (two replicas racing once, across a Lease handover), the oldest is kept
and the others deleted.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from receiver.status.descriptions import ERROR, FAILURE, PENDING, SUCCESS
from receiver.status.previews import PreviewItem

PREVIEW, DEPLOYED = "preview", "deployed"
_ICONS = {SUCCESS: "\u2705", PENDING: "\u23f3", FAILURE: "\u274c", ERROR: "\u26a0\ufe0f"}
_RANK = {SUCCESS: 0, PENDING: 1, ERROR: 2, FAILURE: 3}
TORN_DOWN = "torn down"
MAX_ITEMS = 100  # objects listed in one comment; more are counted, not listed
SHORT_SHA = 12


def marker(kind: str, cluster: str) -> str:
    """The HTML comment a comment is found again by (the cluster name percent-encoded, so no
    name can end the HTML comment early)."""
    return f"<!-- gitea-flux-bridge:{kind} cluster={quote(cluster, safe='')} -->"


@dataclass(frozen=True, slots=True)
class Posted:
    """A comment Gitea shows: its id, body and poster."""

    id: int
    body: str
    login: str


@dataclass(frozen=True, slots=True)
class Found:
    """The bridge's comment with a marker (the oldest), and any duplicates to delete."""

    comment: Posted | None
    duplicates: tuple[int, ...] = ()


def find(comments: Iterable[Posted], mark: str, login: str) -> Found:
    """Our comments carrying `mark`: the oldest (lowest id) is the one; the rest duplicates.
    A comment by anyone else is never ours, whatever it quotes."""
    ours = sorted((c for c in comments if c.login == login and mark in c.body),
                  key=lambda c: c.id)
    if not ours:
        return Found(None)
    return Found(ours[0], tuple(c.id for c in ours[1:]))


def _cell(text: str) -> str:
    """Text fit for a Markdown table cell: no markup, no pipes or line breaks."""
    escaped = html.escape(" ".join(text.split()), quote=False)
    for char in "\\`*_[]|":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


def _code(text: str) -> str:
    """Text fit for a code span in a table cell: no backticks, pipes escaped (GFM)."""
    return " ".join(text.replace("`", "'").split()).replace("|", "\\|")


def _commit_link(web: str, sha: str | None) -> str:
    if not sha:
        return "\u2014"
    return f"[`{sha[:SHORT_SHA]}`]({web}/commit/{sha})"


def overall(items: Sequence[PreviewItem]) -> str:
    """The worst state among the objects (failure > error > pending > success)."""
    return max((i.state for i in items), key=lambda s: _RANK.get(s, 1), default=PENDING)


def render_preview(cluster: str, number: int, items: Sequence[PreviewItem], web: str) -> str:
    """The comment for a live preview. `web` is the repository's web URL on the instance."""
    ordered = sorted(items, key=lambda i: i.sort_key)
    state = overall(ordered)
    lines = [marker(PREVIEW, cluster),
             f"### {_ICONS.get(state, '')} Preview of #{number} on cluster "
             f"`{_code(cluster)}`: {state}", ""]
    urls = sorted({i.preview_url for i in ordered if i.preview_url})
    lines += [f"Preview: <{url}>" for url in urls]
    if urls:
        lines.append("")
    lines += ["| Object | State | Commit | Commit status |", "| --- | --- | --- | --- |"]
    for item in ordered[:MAX_ITEMS]:
        status = f"[`{_code(item.context)}`]({web}/commit/{item.commit})" \
            if item.context and item.commit else "\u2014"
        lines.append(
            f"| {item.kind} `{_code(item.namespace)}/{_code(item.name)}` "
            f"| {_ICONS.get(item.state, '')} {item.state}"
            f"{': ' + _cell(item.detail) if item.detail else ''} "
            f"| {_commit_link(web, item.commit)} | {status} |")
    if len(ordered) > MAX_ITEMS:
        lines += ["", f"and {len(ordered) - MAX_ITEMS} more objects"]
    return "\n".join(lines) + "\n"


def render_torn_down(cluster: str, number: int) -> str:
    return (f"{marker(PREVIEW, cluster)}\n### Preview of #{number} on cluster "
            f"`{_code(cluster)}`: {TORN_DOWN}\n\nIts objects are gone from the cluster.\n")


def is_torn_down(body: str) -> bool:
    first = body.split("\n", 2)[1] if body.count("\n") >= 1 else ""
    return first.endswith(f": {TORN_DOWN}")


def wanted_preview(cluster: str, number: int, items: Sequence[PreviewItem], shown: Posted | None,
                   web: str) -> str | None:
    """What the preview comment should say: the objects while there are any; once they are
    gone, torn down, but only where a comment exists (no comment is created to say nothing
    is there). None: no comment is wanted."""
    if items:
        return render_preview(cluster, number, items, web)
    if shown is None:
        return None
    return render_torn_down(cluster, number)


@dataclass(frozen=True, slots=True)
class DeployedLine:
    """An object that deployed a merged pull request's merge commit."""

    kind: str
    namespace: str
    name: str
    sha: str


def render_deployed(cluster: str, number: int, lines: Iterable[DeployedLine], web: str) -> str:
    out = [marker(DEPLOYED, cluster),
           f"### {_ICONS[SUCCESS]} #{number} deployed on cluster `{_code(cluster)}`", ""]
    for line in sorted(set(lines), key=lambda d: (d.kind, d.namespace, d.name, d.sha))[:MAX_ITEMS]:
        out.append(f"- {line.kind} `{_code(line.namespace)}/{_code(line.name)}` runs "
                   f"{_commit_link(web, line.sha)}")
    return "\n".join(out) + "\n"


def merge_deployed(shown: Posted | None, cluster: str, number: int,
                   new: Iterable[DeployedLine], web: str) -> str:
    """The deployment comment with `new` lines added to those it already shows: a line once
    written stays (the commit was deployed there, whatever runs now)."""
    known = set(new) | (set(parse_deployed(shown.body)) if shown is not None else set())
    return render_deployed(cluster, number, known, web)


def parse_deployed(body: str) -> list[DeployedLine]:
    """The lines a deployment comment shows (as `render_deployed` writes them)."""
    out: list[DeployedLine] = []
    for line in body.splitlines():
        if not line.startswith("- ") or " runs [`" not in line:
            continue
        head, _, tail = line[2:].partition(" runs [`")
        kind, _, rest = head.partition(" `")
        ref = rest.rstrip("`")
        namespace, _, name = ref.partition("/")
        sha = tail.rpartition("/commit/")[2].rstrip(")")
        if kind and namespace and name and sha:
            out.append(DeployedLine(kind, _unescape(namespace), _unescape(name), sha))
    return out


def _unescape(text: str) -> str:
    return text.replace("\\|", "|")


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do to Gitea: create a comment, edit one, delete duplicates (any of them)."""

    create: str | None = None
    edit: tuple[int, str] | None = None
    delete: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return self.create is None and self.edit is None and not self.delete


def plan(found: Found, wanted: str | None) -> Plan:
    """Make Gitea show `wanted` in exactly one comment: edit ours if it says otherwise, create
    one if there is none (and something is wanted), delete the duplicates."""
    if found.comment is None:
        return Plan(create=wanted, delete=found.duplicates)
    edit = (found.comment.id, wanted) if wanted is not None and \
        found.comment.body.strip() != wanted.strip() else None
    return Plan(edit=edit, delete=found.duplicates)


def edit_delay(last: float | None, now: float, interval: float) -> float:
    """Seconds until a pull request's comment may be written again (edits are coalesced:
    at most one per `interval`)."""
    if last is None:
        return 0.0
    return max(0.0, last + interval - now)
