"""Whether a later commit contains a pushed one: Gitea's compare API, asked once per pair."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from receiver.config import GiteaInstance, SecretSource
from receiver.delivery.ancestry import Ancestry
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.gitea.client import GiteaClient, GiteaError
from tests.conftest import until
from tests.fakegitea import FakeGitea, gitea_transport

pytestmark = pytest.mark.anyio

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)  # D: on another line from A


def _source(url: str = "https://gitea.example.com/platform/fleet.git") -> FluxObject:
    return FluxObject({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                       "metadata": {"name": "fleet", "namespace": "flux-system"},
                       "spec": {"url": url}, "status": {}})


async def _read_token(source: SecretSource, fresh: bool) -> str:
    return "t0ken"


def _client(fake: FakeGitea) -> GiteaClient:
    transport, _ = gitea_transport({"gitea.example.com": fake})
    instance = GiteaInstance.model_validate(
        {"name": "eu", "url": "https://gitea.example.com", "token": {"file": "/dev/null"}})
    return GiteaClient([instance], _read_token, transport=transport)


async def test_the_compare_api_tells_ancestors_from_other_lines_of_history() -> None:
    fake = FakeGitea(token="t0ken", parents={A: (), B: (A,), C: (B,), D: (A,)})
    client = _client(fake)
    try:
        assert await client.contains("eu", "platform", "fleet", A, C)
        assert await client.contains("eu", "platform", "fleet", B, C)
        assert await client.contains("eu", "platform", "fleet", C, C)
        assert not await client.contains("eu", "platform", "fleet", C, B)  # newer than held
        assert not await client.contains("eu", "platform", "fleet", D, C)  # another line
        assert not await client.contains("eu", "platform", "fleet", "e" * 40, C)  # unknown: 404
        fake.fail.append(503)
        with pytest.raises(GiteaError):
            await client.contains("eu", "platform", "fleet", A, C)
    finally:
        await client.aclose()
    assert fake.compares[0] == ("platform", "fleet", C, A)  # held...ours
    assert fake.problems == []


class _Asker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.answers: dict[tuple[str, str], bool | Exception | None] = {}
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, source: FluxObject, ours: str, held: str) -> bool | None:
        self.calls.append((ours, held))
        await self.release.wait()
        answer = self.answers.get((ours, held), False)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_an_unknown_pair_is_asked_once_and_the_answer_remembered() -> None:
    asker, told = _Asker(), []
    asker.answers[(A, C)] = True
    asker.release.clear()
    ancestry = Ancestry(asker, told.append)
    src = _source()
    assert ancestry.contains(src, A, C) is None
    assert ancestry.contains(src, A, C) is None  # still asking: not asked twice
    asker.release.set()
    await until(lambda: told, what="the answer")
    assert told == [ObjectKey("GitRepository", "flux-system", "fleet")]
    assert ancestry.contains(src, A, C) is True
    assert ancestry.contains(src, A.upper(), C) is True  # one commit, any case
    assert asker.calls == [(A, C)]


async def test_no_gitea_for_the_repository_means_not_contained() -> None:
    asker = _Asker()
    asker.answers[(A, C)] = None
    ancestry = Ancestry(asker, lambda key: None)
    assert ancestry.contains(_source(), A, C) is None
    await until(lambda: ancestry.contains(_source(), A, C) is False, what="the answer")


async def test_a_failed_question_answers_no_until_it_is_asked_again() -> None:
    now = [0.0]
    asker, told = _Asker(), []
    asker.answers[(A, C)] = GiteaError("down", retryable=True)
    ancestry = Ancestry(asker, told.append, retry_seconds=30, clock=lambda: now[0])
    assert ancestry.contains(_source(), A, C) is None
    await until(lambda: told, what="the failure")
    assert ancestry.contains(_source(), A, C) is False
    now[0] = 29.0
    assert ancestry.contains(_source(), A, C) is False and len(asker.calls) == 1
    asker.answers[(A, C)] = True
    now[0] = 31.0
    assert ancestry.contains(_source(), A, C) is None
    await until(lambda: ancestry.contains(_source(), A, C) is True, what="asked again")
    assert len(asker.calls) == 2


async def test_memory_and_questions_in_flight_are_bounded() -> None:
    asker = _Asker()
    asker.release.clear()
    ancestry = Ancestry(asker, lambda key: None, max_entries=3, max_asking=2)
    commits = [f"{n:040x}" for n in range(6)]
    assert [ancestry.contains(_source(), c, C) for c in commits[:3]] == [None, None, False]
    asker.release.set()
    await until(lambda: not ancestry._asking, what="both answers")
    for c in commits[2:]:
        ancestry.contains(_source(), c, C)
    await until(lambda: not ancestry._asking, what="the rest")
    assert len(ancestry._known) == 3


def test_without_a_running_loop_nothing_is_asked() -> None:
    asker = _Asker()
    assert Ancestry(asker, lambda key: None).contains(_source(), A, C) is False
    assert asker.calls == []


def test_a_source_without_a_url_is_not_asked_about() -> None:
    asker = _Asker()
    src: Any = _source(url="")
    assert Ancestry(asker, lambda key: None).contains(src, A, C) is False
