"""Deployment badges: which state a repository and branch is in, and its SVG. Pure.

URL shape (served by `receiver.web.badge`):
    GET /badge/{owner}/{repo}.svg?branch=<b>&cluster=<c>&style=flat|flat-square&token=<t>
    GET /badge/{owner}/{repo}.svg?environment=<e>&branch=<b>&...   (an environment's aggregate)
`branch` may contain '/' (it is a query parameter, not a path segment); without it every Git
source of the repository counts. `cluster` names the cluster the badge is about; this bridge
only knows its own, so another name reads "unknown". With a badge key configured every badge
needs `token`, minted by `gitea-flux-bridge badge-url` for exactly that owner/repo/branch.

An environment badge (`statuses.fleet.environments`) shows the environment's aggregate status
(`flux/env/<e>`) in Gitea on the commit this cluster's sources hold, labelled with its name.

The look is shields.io's flat and flat-square styles with Gitea's colours.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.sax.saxutils import escape

from itsdangerous import BadSignature, URLSafeSerializer

from receiver.flux.objects import CONSUMER_KINDS, FluxObject, consumer_source
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push
from receiver.push.routing import ref_match
from receiver.status.descriptions import FAILURE, PENDING, SUCCESS, gitea_state
from receiver.status.repos import repo_ref, source_commit

UNKNOWN = "unknown"
COLOURS = {SUCCESS: "#4c1", FAILURE: "#e05d44", PENDING: "#dfb317", UNKNOWN: "#9f9f9f"}
MESSAGES = {SUCCESS: "deployed", FAILURE: "failed", PENDING: "deploying", UNKNOWN: "unknown"}
# Worst first: one failing consumer makes the repository's badge red.
_SEVERITY = (FAILURE, PENDING, SUCCESS)
STYLES = ("flat", "flat-square")
_SALT = "gitea-flux-bridge/badge"

# Approximate advance widths of Verdana at 11px, as shields lays badges out.
_NARROW = set("fijlrtI.,:;'!|()[]{} ")
_WIDE = set("mwMW@%")


def char_width(ch: str) -> float:
    if ch in _NARROW:
        return 3.9 if ch == " " else 4.0
    if ch in _WIDE:
        return 10.5
    if ch.isdigit():
        return 7.0
    if ch.isupper():
        return 7.6
    return 6.6 if ch.isascii() else 8.0


def text_width(text: str) -> float:
    return round(sum(char_width(ch) for ch in text), 1)


def _text(x: float, ltl: int, text: str, *, shadow: bool) -> str:
    if shadow:
        return (f'<text aria-hidden="true" x="{x:g}" y="150" fill="#010101" fill-opacity=".3" '
                f'transform="scale(.1)" textLength="{ltl}">{text}</text>')
    return (f'<text x="{x:g}" y="140" transform="scale(.1)" fill="#fff" textLength="{ltl}">'
            f"{text}</text>")


def _xml_text(text: str) -> str:
    """Escaped for text and attributes; characters XML 1.0 cannot hold at all are dropped."""
    kept = "".join(ch for ch in text if ch >= " " and ch not in "\ufffe\uffff"
                   and not "\ud800" <= ch <= "\udfff")
    return escape(kept, {'"': "&quot;"})


def render_badge(label: str, message: str, colour: str, style: str = "flat") -> str:
    """A shields-style two-part badge. Text is escaped; an unknown style renders flat."""
    label, message = " ".join(label.split()), " ".join(message.split())
    lw = round(text_width(label) + 10)
    mw = round(text_width(message) + 10)
    width = lw + mw
    lab, msg, col = _xml_text(label), _xml_text(message), _xml_text(colour)
    title = f"{lab}: {msg}"
    # Text is laid out at 10x and scaled down, as shields does, for sub-pixel centring.
    lx, mx = lw * 5, (lw + mw / 2) * 10
    ltl, mtl = round(text_width(label) * 10), round(text_width(message) * 10)
    rects = (f'<rect width="{lw}" height="20" fill="#555"/>'
             f'<rect x="{lw}" width="{mw}" height="20" fill="{col}"/>')
    if style == "flat-square":
        body = f'<g shape-rendering="crispEdges">{rects}</g>'
        texts = _text(lx, ltl, lab, shadow=False) + _text(mx, mtl, msg, shadow=False)
    else:
        body = ('<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" '
                'stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient>'
                f'<clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/>'
                f'</clipPath><g clip-path="url(#r)">{rects}'
                f'<rect width="{width}" height="20" fill="url(#s)"/></g>')
        texts = (_text(lx, ltl, lab, shadow=True) + _text(lx, ltl, lab, shadow=False)
                 + _text(mx, mtl, msg, shadow=True) + _text(mx, mtl, msg, shadow=False))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
        f'aria-label="{title}"><title>{title}</title>{body}'
        '<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" '
        f'text-rendering="geometricPrecision" font-size="110">{texts}</g></svg>'
    )


def badge_svg(label: str, state: str, style: str = "flat") -> str:
    state = state if state in COLOURS else UNKNOWN
    return render_badge(label, MESSAGES[state], COLOURS[state], style)


# -- tokens ----------------------------------------------------------------------------------


def _serializer(key: str) -> URLSafeSerializer:
    return URLSafeSerializer(key, salt=_SALT)


def mint_badge_token(key: str, owner: str, repo: str, branch: str) -> str:
    """A signed, non-expiring token for one owner/repo/branch (badges live in READMEs)."""
    return str(_serializer(key).dumps([owner.lower(), repo.lower(), branch]))


def token_allows(key: str, token: str, owner: str, repo: str, branch: str) -> bool:
    """True only for a token this key signed for exactly this owner/repo/branch."""
    if not token or not key:
        return False
    try:
        value = _serializer(key).loads(token)
    except BadSignature:
        return False
    except Exception:  # a token that decodes to garbage is just a bad token
        return False
    return bool(value == [owner.lower(), repo.lower(), branch])


# -- state -----------------------------------------------------------------------------------


def object_state(obj: FluxObject) -> str:
    """success, failure, pending or unknown for one consumer's live state."""
    if obj.suspended:
        return UNKNOWN
    ready = obj.condition("Ready") or {}
    stalled = obj.condition("Stalled") or {}
    if stalled.get("status") == "True":
        return FAILURE
    status = ready.get("status")
    if status == "True":
        return SUCCESS
    if status == "False":
        mapped = gitea_state(str(ready.get("reason", "")), "error")
        return PENDING if mapped == PENDING else FAILURE
    return PENDING if ready else UNKNOWN


def combine(states: Iterable[str]) -> str:
    """The worst state; nothing known -> unknown."""
    found = set(states)
    for state in _SEVERITY:
        if state in found:
            return state
    return UNKNOWN


def _branch_matches(source: FluxObject, branch: str | None) -> bool:
    if branch is None:
        return True
    push = Push(repo_urls=(), full_name="", ref=f"refs/heads/{branch}", sha="")
    return ref_match(source.spec.get("ref"), push)[0]


def _sources(store: ObjectStore, owner: str, repo: str, branch: str | None) -> list[FluxObject]:
    """The GitRepositories of owner/repo (any host, case-insensitive) that follow `branch`."""
    wanted = (owner.lower(), repo.lower())
    found = []
    for source in store.list("GitRepository"):
        url = source.spec.get("url")
        ref = repo_ref(store.normalise_url(url)) if isinstance(url, str) else None
        if ref is not None and (ref.owner.lower(), ref.name.lower()) == wanted \
                and _branch_matches(source, branch):
            found.append(source)
    return found


def select_consumers(
    store: ObjectStore, owner: str, repo: str, branch: str | None
) -> list[FluxObject]:
    """Consumers whose GitRepository is owner/repo (any host) and follows the branch."""
    found: list[FluxObject] = []
    for source in _sources(store, owner, repo, branch):
        found.extend(c for c in store.consumers_of(source.key) if c.kind in CONSUMER_KINDS
                     and consumer_source(c) is not None)
    return found


def repository_state(store: ObjectStore, owner: str, repo: str, branch: str | None) -> str:
    return combine(object_state(c) for c in select_consumers(store, owner, repo, branch))


# -- environments (`?environment=`) ------------------------------------------------------------


def deployed_commit(store: ObjectStore, owner: str, repo: str, branch: str | None) -> str | None:
    """The commit this cluster's Git sources of owner/repo (following `branch`) hold: the one an
    environment badge asks Gitea about. None when none holds one, or they disagree."""
    commits = {c for c in map(source_commit, _sources(store, owner, repo, branch)) if c}
    return commits.pop() if len(commits) == 1 else None


def status_state(state: str | None) -> str:
    """A Gitea state as a badge state: an environment's aggregate status."""
    if state == SUCCESS:
        return SUCCESS
    if state in (FAILURE, "error"):
        return FAILURE
    if state == PENDING:
        return PENDING
    return UNKNOWN
