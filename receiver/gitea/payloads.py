"""What a push says, read defensively from Gitea's webhook JSON or an Actions step's body.

Gitea's payloads are large and vary by version; routing needs a handful of fields. Everything
is checked for type before use (Argo CD's webhook CVEs were crashes on missing fields), and a
payload without what routing needs is a `PayloadError` (HTTP 422), never an exception trace.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

_HEX = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
# `${{ gitea.repository }}`: Gitea owner and repository names (letters, digits, `-_.`).
_OWNER_NAME = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
MAX_PATHS = 20_000
# Field limits, in UTF-8 bytes; a longer field is a 422 that names it. Each value is copied
# into the delivery, its reply and its log lines, so none may run to megabytes.
# - A path: Linux's PATH_MAX. Git stores longer names, but no checkout (Flux's included) can
#   write them, so no Kustomization path can be under one.
MAX_PATH_BYTES = 4096
# - A ref: Git keeps a loose ref as a file, so each `/`-separated part is at most 255 bytes
#   (NAME_MAX), and Gitea stores branch and tag names in 255-character columns. 1024 bytes is
#   several such parts; it is also copied into every skip reason, so it stays well below 4096.
MAX_REF_BYTES = 1024
# - A repository URL: Gitea's own are its ROOT_URL plus owner (<= 40) and name (<= 100).
MAX_URL_BYTES = 2048
MAX_FULL_NAME_BYTES = 256
# Routing lists every directory above each changed file; a deep path costs about its depth
# times its length. Above this bound the file list counts as incomplete (every consumer of the
# matched source is touched, as for a push of more than MAX_PATHS files): never less work
# than the push needs, never quadratic memory.
MAX_PATH_WORK = 16 * 1024 * 1024


class PayloadError(ValueError):
    """The payload lacks or garbles something routing needs (HTTP 422)."""


@dataclass(frozen=True, slots=True)
class Push:
    """A push, reduced to what routing and statuses need."""

    repo_urls: tuple[str, ...]  # clone_url, html_url, ssh_url: any may match a source URL
    full_name: str  # owner/repo, "" when unknown
    ref: str  # full ref: refs/heads/main, refs/tags/v1.0.0
    sha: str  # the commit the ref now points at ("" for a deletion)
    paths: frozenset[str] = field(default_factory=frozenset)
    # False when the file list may be missing changes (truncated commits, tag pushes,
    # an Actions call that sent none): routing then touches every consumer.
    paths_complete: bool = False
    deleted: bool = False

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.ref.startswith("refs/tags/") else None


def as_object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def checked(value: str, field: str, limit: int) -> str:
    """`value` if it is valid Unicode (no lone surrogate, which JSON allows and UTF-8 cannot
    carry) of at most `limit` UTF-8 bytes; else a PayloadError naming `field`."""
    if len(value) > limit:  # characters >= bytes / 4: cheap rejection of the huge ones
        raise PayloadError(f"{field} is longer than {limit} bytes")
    if value.isascii():  # nearly every path and URL: one byte per character, no surrogate
        return value
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise PayloadError(f"{field} is not valid UTF-8 text") from None
    if size > limit:
        raise PayloadError(f"{field} is longer than {limit} bytes")
    return value


def _path_work(paths: set[str]) -> int:
    """An upper bound of what listing every ancestor directory of `paths` costs (characters)."""
    return sum((p.count("/") + 1) * len(p) for p in paths)


def required_ref(value: Any, field: str, missing: str) -> str:
    """A ref field, checked like any other (`checked`); PayloadError(`missing`) when empty."""
    ref = checked(as_text(value), field, MAX_REF_BYTES)
    if not ref:
        raise PayloadError(missing)
    return ref


def required_sha(value: Any, missing: str) -> str:
    """A full commit id (`commit_sha`); PayloadError(`missing`) when it is not one."""
    sha = commit_sha(value)
    if not sha:
        raise PayloadError(missing)
    return sha


def full_ref(ref: str) -> str:
    if ref.startswith("refs/"):
        return ref
    return f"refs/heads/{ref}"


def commit_sha(value: Any) -> str:
    sha = as_text(value).lower()
    return sha if _HEX.match(sha) else ""


def is_zero_sha(sha: str) -> bool:
    return bool(sha) and set(sha) == {"0"}


def _paths_of(commit: dict[str, Any], index: int, found: set[str]) -> None:
    """Add the commit's changed files to `found`, each checked like any other field."""
    for key in ("added", "removed", "modified"):
        items = commit.get(key)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                continue
            path = item.strip().lstrip("/")
            if not (path.isascii() and len(path) <= MAX_PATH_BYTES):
                # The usual path is short ASCII; the rest is measured (and named if refused).
                path = checked(path, f"commits[{index}].{key}[{i}]", MAX_PATH_BYTES)
            found.add(path)


MAX_FORM_FIELDS = 50


# The longest spelling of the field name: `payload` with every byte %-escaped.
_FORM_KEY_MAX = 3 * len("payload")


def form_payload(body: bytes) -> bytes:
    """The `payload` field of a form-encoded webhook body (`payload=<url-encoded JSON>`): the
    JSON document Gitea signed. PayloadError (HTTP 400) for a form without it or with more
    than MAX_FORM_FIELDS fields, never an exception of the parser.

    Read before the signature can be checked, so it costs little whoever sends it: the body is
    split at most MAX_FORM_FIELDS times, only a name short enough to spell `payload` is
    decoded, and only the first such field's value, in C (about 10 ms for 3 MiB of `%41`;
    urllib's decoder took 0.6 s). As Go's url.ParseQuery (what Gitea's encoder is paired with),
    a malformed %-escape is an error, and the bytes are the ones Gitea signed, UTF-8 or not."""
    fields = body.split(b"&", MAX_FORM_FIELDS)
    if len(fields) > MAX_FORM_FIELDS:
        raise PayloadError(f"form body has more than {MAX_FORM_FIELDS} fields")
    for item in fields:
        name, equals, value = item.partition(b"=")
        if equals and value and len(name) <= _FORM_KEY_MAX and _unquote(name) == b"payload":
            return _unquote(value)
    raise PayloadError("form body has no payload field")


_SLICE = 128 * 1024


def _unquote(text: bytes) -> bytes:
    """application/x-www-form-urlencoded decoding: `+` is a space, `%XX` a byte. In slices of
    128 KiB (never cutting an escape), so no single step holds the interpreter for long when
    this runs off the event loop, and the copies stay small."""
    if len(text) <= _SLICE:
        return _unquote_slice(text)
    parts = []
    start = 0
    while start < len(text):
        end = min(len(text), start + _SLICE)
        if end < len(text):
            cut = text.rfind(b"%", end - 2, end)
            end = cut if cut > start else end
        parts.append(_unquote_slice(text[start:end]))
        start = end
    return b"".join(parts)


def _unquote_slice(text: bytes) -> bytes:
    text = text.replace(b"+", b" ")
    if b"%" not in text:
        return text
    # `codecs.escape_decode` turns `\xXX` into a byte in one pass in C: with every backslash
    # of the text doubled first, the only other escape left is `\\`, a backslash.
    try:
        decoded, _ = codecs.escape_decode(text.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))
    except ValueError:
        raise PayloadError("form body has a malformed %-escape") from None
    return bytes(decoded)


def parse_gitea_push(doc: Any) -> Push:
    """A Gitea `push` webhook payload (JSON already decoded)."""
    if not isinstance(doc, dict):
        raise PayloadError("payload must be a JSON object")
    repo = as_object(doc.get("repository"))
    urls = repository_urls(repo)
    ref = checked(as_text(doc.get("ref")), "ref", MAX_REF_BYTES)
    if not ref:
        raise PayloadError("payload has no ref")
    full_name = checked(as_text(repo.get("full_name")), "repository.full_name", MAX_FULL_NAME_BYTES)
    after = commit_sha(doc.get("after"))
    deleted = is_zero_sha(after)
    # An annotated tag's `after` is the tag object; head_commit names the commit.
    head = commit_sha(as_object(doc.get("head_commit")).get("id"))
    sha = "" if deleted else (head or after)
    if not sha and not deleted:
        raise PayloadError("payload has no commit id (after / head_commit.id)")
    commits = doc.get("commits")
    commits = [c for c in commits if isinstance(c, dict)] if isinstance(commits, list) else []
    paths: set[str] = set()
    for index, commit in enumerate(commits):
        _paths_of(commit, index, paths)
    total = doc.get("total_commits")
    # Gitea keeps only the newest FEED_MAX_COMMIT_NUM commits; older payloads lack the count.
    complete = (
        isinstance(total, int)
        and total == len(commits)
        and total > 0
        and not ref.startswith("refs/tags/")
        and len(paths) <= MAX_PATHS
        and _path_work(paths) <= MAX_PATH_WORK
    )
    return Push(
        repo_urls=urls,
        full_name=full_name,
        ref=full_ref(ref),
        sha=sha,
        paths=frozenset(paths) if complete else frozenset(),
        paths_complete=complete,
        deleted=deleted,
    )


# -- the compiled decoder for a push ----------------------------------------------------------
# A push body is mostly what routing never reads (the pusher, the sender, every commit's author,
# message and URLs). msgspec decodes the few fields `parse_gitea_push` reads, and only checks
# the syntax of the rest, without building it: a quarter of `json.loads`' cost for Gitea's
# 8 KiB pushes. A body of any other shape fails these types and takes the general path.


class _Repository(msgspec.Struct):
    clone_url: Any = msgspec.UNSET
    html_url: Any = msgspec.UNSET
    ssh_url: Any = msgspec.UNSET
    full_name: Any = msgspec.UNSET


class _Commit(msgspec.Struct):
    added: Any = msgspec.UNSET
    removed: Any = msgspec.UNSET
    modified: Any = msgspec.UNSET


class _HeadCommit(msgspec.Struct):
    id: Any = msgspec.UNSET


class _PushDocument(msgspec.Struct):
    after: Any = msgspec.UNSET
    ref: Any = msgspec.UNSET
    total_commits: Any = msgspec.UNSET
    head_commit: _HeadCommit | msgspec.UnsetType | None = msgspec.UNSET
    commits: list[_Commit] | msgspec.UnsetType | None = msgspec.UNSET
    repository: _Repository | msgspec.UnsetType | None = msgspec.UNSET


_PUSH_DECODER = msgspec.json.Decoder(_PushDocument)


def _present(struct: msgspec.Struct) -> dict[str, Any]:
    """The fields of a decoded struct that the body had, as the dict `json.loads` gives."""
    return {k: v for k, v in msgspec.structs.asdict(struct).items() if v is not msgspec.UNSET}


def push_document(body: bytes) -> dict[str, Any] | None:
    """The fields `parse_gitea_push` reads of a body that is a Gitea push, decoded exactly as
    `json.loads` decodes them; None when the body may be anything else (not UTF-8, not a JSON
    object, a field of another type than a push has, no push key at all): the caller then
    decodes it in full. The compiled decoder refuses some JSON that `json.loads` takes (NaN,
    a lone surrogate, a byte-order mark): those bodies take the general path too."""
    if not body.isascii():
        try:
            body.decode()  # the decoder does not check the UTF-8 of the strings it skips
        except UnicodeDecodeError:
            return None
    try:
        decoded = _PUSH_DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    if (decoded.after is msgspec.UNSET and decoded.commits is msgspec.UNSET
            and decoded.head_commit is msgspec.UNSET):
        return None
    doc = _present(decoded)
    if isinstance(decoded.head_commit, _HeadCommit):
        doc["head_commit"] = _present(decoded.head_commit)
    if isinstance(decoded.repository, _Repository):
        doc["repository"] = _present(decoded.repository)
    if isinstance(decoded.commits, list):
        doc["commits"] = [_present(c) for c in decoded.commits]
    return doc


def parse_actions_body(doc: Any) -> Push:
    """The optional JSON body of an Actions step: {repository, ref, sha, paths?}.

    `repository` is a clone or web URL (`$GITHUB_SERVER_URL/$GITHUB_REPOSITORY`), or just
    `owner/name` (`${{ gitea.repository }}`): then `repo_urls` is empty and routing matches the
    name on every configured Gitea host. Without `paths` the file list is incomplete and every
    consumer of the matched source is touched.
    """
    if not isinstance(doc, dict):
        raise PayloadError("body must be a JSON object")
    repository = checked(as_text(doc.get("repository")), "repository", MAX_URL_BYTES)
    by_name = bool(_OWNER_NAME.match(repository)) and not repository.endswith((".", "/"))
    if not by_name and "://" not in repository and "@" not in repository:
        raise PayloadError("repository must be the repository's URL or owner/name")
    ref = required_ref(doc.get("ref"), "ref", "ref is required")
    sha = required_sha(doc.get("sha"), "sha must be a full 40- or 64-character commit id")
    raw_paths = doc.get("paths")
    paths: set[str] = set()
    complete = False
    if isinstance(raw_paths, list):
        if not all(isinstance(p, str) for p in raw_paths) or len(raw_paths) > MAX_PATHS:
            raise PayloadError("paths must be a list of strings")
        paths = {checked(p.strip().lstrip("/"), f"paths[{i}]", MAX_PATH_BYTES)
                 for i, p in enumerate(raw_paths) if p.strip()}
        complete = bool(paths)
        if _path_work(paths) > MAX_PATH_WORK:
            paths, complete = set(), False
    elif raw_paths is not None:
        raise PayloadError("paths must be a list of strings")
    full_name = "/".join(repository.rstrip("/").removesuffix(".git").split("/")[-2:])
    return Push(
        repo_urls=() if by_name else (repository,),
        full_name=full_name,
        ref=full_ref(ref),
        sha=sha,
        paths=frozenset(paths),
        paths_complete=complete,
    )

def repository_urls(repo: dict[str, Any]) -> tuple[str, ...]:
    """The repository's clone, web and SSH URLs (at least one), each within its bound."""
    urls = tuple(
        checked(u, f"repository.{k}", MAX_URL_BYTES)
        for k, u in ((k, as_text(repo.get(k))) for k in ("clone_url", "html_url", "ssh_url")) if u)
    if not urls:
        raise PayloadError("payload has no repository.clone_url, html_url or ssh_url")
    return urls
