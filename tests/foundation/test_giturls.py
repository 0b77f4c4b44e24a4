from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.giturls import (
    normalise_aliases,
    normalise_host,
    normalise_repo_url,
    repo_base,
    repo_full_name,
)

INTERNAL = "gitea-http.gitea.svc.cluster.local"
ALIASES = {
    f"{INTERNAL}:3000": "gitea.example.com",
    "ssh.gitea.example.com": "gitea.example.com",
    "ssh.gitea.example.com:2222": "gitea.example.com",
}


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://gitea.example.com/org/repo", "gitea.example.com/org/repo"),
        ("https://gitea.example.com/org/repo.git", "gitea.example.com/org/repo"),
        ("https://gitea.example.com:443/org/repo", "gitea.example.com/org/repo"),
        ("https://gitea.example.com:8443/org/repo", "gitea.example.com:8443/org/repo"),
        ("http://gitea.example.com/org/repo", "gitea.example.com/org/repo"),
        ("http://gitea.example.com:80/org/repo", "gitea.example.com/org/repo"),
        ("http://gitea:3000/org/repo.git", "gitea:3000/org/repo"),
        # Another scheme's default port is just a port.
        ("http://gitea.example.com:443/org/repo", "gitea.example.com:443/org/repo"),
        ("ssh://git@gitea.example.com/org/repo.git", "gitea.example.com/org/repo"),
        ("ssh://git@gitea.example.com:22/org/repo.git", "gitea.example.com/org/repo"),
        ("ssh://git@gitea.example.com:2222/org/repo.git", "gitea.example.com:2222/org/repo"),
        ("git+ssh://git@gitea.example.com/org/repo", "gitea.example.com/org/repo"),
        ("git@gitea.example.com:org/repo.git", "gitea.example.com/org/repo"),
        ("git@gitea.example.com:/org/repo.git", "gitea.example.com/org/repo"),
        ("gitea.example.com:org/repo", "gitea.example.com/org/repo"),
        ("git://gitea.example.com/org/repo.git", "gitea.example.com/org/repo"),
        ("git://gitea.example.com:9418/org/repo", "gitea.example.com/org/repo"),
        ("HTTPS://Gitea.Example.COM/Org/Repo.GIT", "gitea.example.com/org/repo"),
        ("https://gitea.example.com/org/repo/", "gitea.example.com/org/repo"),
        ("https://gitea.example.com/org/repo.git/", "gitea.example.com/org/repo"),
        ("https://gitea.example.com//org//repo//", "gitea.example.com/org/repo"),
        ("https://gitea.example.com./org/repo", "gitea.example.com/org/repo"),
        ("https://user:s3cr@t@gitea.example.com/org/repo", "gitea.example.com/org/repo"),
        ("https://oauth2@gitea.example.com/org/repo", "gitea.example.com/org/repo"),
        ("https://gitea.example.com/org/repo?ref=main#readme", "gitea.example.com/org/repo"),
        ("  https://gitea.example.com/org/repo\n", "gitea.example.com/org/repo"),
        ("https://example.com/gitea/org/repo.git", "example.com/gitea/org/repo"),
        ("https://[2001:db8::1]:3000/org/repo", "[2001:db8::1]:3000/org/repo"),
        ("git@[2001:DB8::1]:org/repo", "[2001:db8::1]/org/repo"),
        ("https://gitea.example.com/org/repo.git.git", "gitea.example.com/org/repo"),
    ],
)
def test_normalise_repo_url(url: str, key: str) -> None:
    assert normalise_repo_url(url) == key


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "garbage",
        "org/repo",
        "/srv/git/repo.git",
        "file:///srv/git/repo.git",
        "ftp://gitea.example.com/org/repo",
        "https://",
        "https://gitea.example.com",
        "https://gitea.example.com/",
        "https:///org/repo",
        "https://user@/org/repo",
        "https://gitea.example.com:http/org/repo",
        "https://gitea.example.com:0/org/repo",
        "https://gitea.example.com:65536/org/repo",
        "https://gitea_.example.com:1:2/org/repo",
        "https://gitea.example.com/org/.git",
        "https:/gitea.example.com/org/repo",  # typo, not a host called https
        "C:/Users/me/repo",
        "C:\\Users\\me\\repo",
        "git@gitea.example.com:",
        "git@gitea.example.com",
        "https://gitea.example.com/org/répo",
        "https://gitea.example.com/org/my repo",
    ],
)
def test_not_repository_urls(url: str) -> None:
    assert normalise_repo_url(url) is None
    assert repo_full_name(url) is None


def test_https_and_ssh_forms_of_one_gitea_repo_agree() -> None:
    # The three URLs of one Gitea push payload.
    clone = "https://gitea.example.com/Org/Repo.git"
    html = "https://gitea.example.com/Org/Repo"
    ssh = "git@gitea.example.com:Org/Repo.git"
    assert len({normalise_repo_url(u) for u in (clone, html, ssh)}) == 1


def test_custom_ssh_port_matches_only_through_an_alias() -> None:
    ssh = "ssh://git@gitea.example.com:2222/org/repo.git"
    https = "https://gitea.example.com/org/repo"
    assert normalise_repo_url(ssh) != normalise_repo_url(https)
    aliases = {"gitea.example.com:2222": "gitea.example.com"}
    assert normalise_repo_url(ssh, aliases) == normalise_repo_url(https, aliases)


@pytest.mark.parametrize(
    ("url", "key"),
    [
        # Alias → canonical: Gitea's in-cluster clone_url meets Flux's public spec.url.
        (f"http://{INTERNAL}:3000/org/repo.git", "gitea.example.com/org/repo"),
        ("git@ssh.gitea.example.com:org/repo.git", "gitea.example.com/org/repo"),
        ("ssh://git@ssh.gitea.example.com:2222/org/repo", "gitea.example.com/org/repo"),
        # The canonical host is left alone.
        ("https://gitea.example.com/org/repo", "gitea.example.com/org/repo"),
        # An alias with a port applies to that port only.
        (f"http://{INTERNAL}/org/repo", f"{INTERNAL}/org/repo"),
        ("ssh://git@ssh.gitea.example.com:2200/org/repo", "ssh.gitea.example.com:2200/org/repo"),
    ],
)
def test_aliases(url: str, key: str) -> None:
    assert normalise_repo_url(url, ALIASES) == key


def test_aliases_work_in_either_direction() -> None:
    internal = f"http://{INTERNAL}:3000/org/repo.git"
    public = "https://gitea.example.com/org/repo"
    to_public = {f"{INTERNAL}:3000": "gitea.example.com"}
    to_internal = {"gitea.example.com": f"{INTERNAL}:3000"}
    for aliases in (to_public, to_internal):
        assert normalise_repo_url(internal, aliases) == normalise_repo_url(public, aliases)
    assert normalise_repo_url(public, to_internal) == f"{INTERNAL}:3000/org/repo"


def test_alias_tables_are_normalised_and_not_transitive() -> None:
    aliases = {" Git@Gitea-HTTP.Gitea.svc:0443 ": "Gitea.Example.com:443", "a.example": "b.example"}
    assert normalise_aliases(aliases) == {
        "gitea-http.gitea.svc": "gitea.example.com",
        "a.example": "b.example",
    }
    key = normalise_repo_url("https://gitea-http.gitea.svc/o/r", aliases)
    assert key == "gitea.example.com/o/r"
    chained = {"a.example": "b.example", "b.example": "c.example"}
    assert normalise_repo_url("https://a.example/o/r", chained) == "b.example/o/r"


@pytest.mark.parametrize(
    ("hostport", "scheme", "expected"),
    [
        ("Gitea.Example.com", "", "gitea.example.com"),
        ("gitea.example.com:443", "", "gitea.example.com"),
        ("gitea.example.com:22", "", "gitea.example.com"),
        ("gitea.example.com:3000", "", "gitea.example.com:3000"),
        ("gitea.example.com:443", "https", "gitea.example.com"),
        ("gitea.example.com:443", "http", "gitea.example.com:443"),
        ("gitea.example.com:22", "SSH", "gitea.example.com"),
        ("git@gitea.example.com:2222", "ssh", "gitea.example.com:2222"),
        ("[2001:DB8::1]:443", "", "[2001:db8::1]"),
        ("not a host", "", "not a host"),
    ],
)
def test_normalise_host(hostport: str, scheme: str, expected: str) -> None:
    assert normalise_host(hostport, scheme) == expected


@pytest.mark.parametrize(
    ("url", "full_name", "base"),
    [
        ("https://gitea.example.com/Org/Repo.git", "Org/Repo", "https://gitea.example.com"),
        ("http://gitea:3000/org/repo", "org/repo", "http://gitea:3000"),
        ("https://u:p@Example.com:443/Gitea/org/repo/", "org/repo", "https://example.com/Gitea"),
        ("ssh://git@gitea.example.com:2222/org/repo.git", "org/repo", None),
        ("git@gitea.example.com:org/repo.git", "org/repo", None),
        ("https://gitea.example.com/repo", None, None),
        ("not a url", None, None),
    ],
)
def test_repo_full_name_and_base(url: str, full_name: str | None, base: str | None) -> None:
    assert repo_full_name(url) == full_name
    assert repo_base(url) == base


# --- properties ---------------------------------------------------------------------------

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_ALNUM = _LOWER + _LOWER.upper() + "0123456789"
# DNS labels: a letter, then letters, digits and inner hyphens.
_label = st.builds(
    lambda first, rest: first + rest.strip("-"),
    st.sampled_from(_LOWER),
    st.text(_LOWER + "0123456789-", max_size=8),
)
hosts = st.lists(_label, min_size=1, max_size=3).map(".".join)
# Gitea names: ASCII letters, digits, `_.-`; never ending in `.git`.
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ALNUM + "_"),
    st.text(_ALNUM + "_.-", max_size=15),
).filter(lambda n: not n.lower().endswith(".git"))
sub_paths = st.lists(names, max_size=2).map(lambda parts: "".join(f"/{p}" for p in parts))


def _forms(host: str, owner: str, repo: str) -> list[str]:
    return [
        f"https://{host}/{owner}/{repo}",
        f"https://{host}:443/{owner}/{repo}.git",
        f"http://{host}/{owner}/{repo}/",
        f"ssh://git@{host}/{owner}/{repo}.git",
        f"ssh://git@{host}:22/{owner}/{repo}",
        f"git@{host}:{owner}/{repo}.git",
        f"git://{host}/{owner}/{repo}",
    ]


@given(hosts, names, names)
def test_all_forms_of_a_repo_agree(host: str, owner: str, repo: str) -> None:
    keys = {normalise_repo_url(url) for url in _forms(host, owner, repo)}
    assert keys == {f"{host}/{owner}/{repo}".lower()}


@given(hosts, st.integers(1, 65535), names, names)
def test_non_default_ports_are_kept(host: str, port: int, owner: str, repo: str) -> None:
    key = normalise_repo_url(f"https://{host}:{port}/{owner}/{repo}")
    hostport = host if port == 443 else f"{host}:{port}"
    assert key == f"{hostport}/{owner}/{repo}".lower()


def _with_case(text: str, flips: list[bool]) -> str:
    flips = flips + [False] * len(text)
    return "".join(c.swapcase() if flip else c for c, flip in zip(text, flips, strict=False))


def _repo_url(form: int, host: str, sub_path: str, owner: str, repo: str) -> str:
    # A Gitea served under a sub-path: the sub-path rides along in front of the owner.
    return _forms(host, f"{sub_path}/{owner}".lstrip("/"), repo)[form]


repo_urls = st.builds(_repo_url, st.integers(0, 6), hosts, sub_paths, names, names)


@given(repo_urls, st.lists(st.booleans()), st.booleans(), st.booleans())
def test_git_suffix_trailing_slash_and_case_never_change_the_key(
    url: str, flips: list[bool], add_git: bool, add_slash: bool
) -> None:
    key = normalise_repo_url(url)
    assert key is not None
    variant = url.removesuffix("/").removesuffix(".git")
    variant += ".git" if add_git else ""
    variant += "/" if add_slash else ""
    assert normalise_repo_url(_with_case(variant, flips)) == key


_url_prefixes = st.sampled_from(["https://", "http://", "ssh://git@", "git://", "git@", "", "HTTPS://"])
_url_chars = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
ascii_urlish = st.one_of(repo_urls, st.builds(lambda p, t: p + t, _url_prefixes, _url_chars))


@given(ascii_urlish)
def test_normalisation_is_idempotent(url: str) -> None:
    key = normalise_repo_url(url)
    if key is None:
        return
    assert key == key.lower() and "://" not in key
    assert not key.endswith(("/", ".git"))
    # Re-read as https, a key is its own normal form. The one exception is a key that kept
    # `:443` because its URL had another scheme, where re-reading it as https drops the port.
    if key.partition("/")[0].endswith(":443"):
        return
    assert normalise_repo_url("https://" + key) == key


@given(ascii_urlish)
def test_case_never_matters(url: str) -> None:
    key = normalise_repo_url(url)
    assert normalise_repo_url(url.upper()) == key
    assert normalise_repo_url(url.swapcase()) == key


@given(st.text(max_size=60))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    key = normalise_repo_url(text, ALIASES)
    assert key is None or key == key.lower()
    repo_full_name(text)
    repo_base(text)
    normalise_host(text)
