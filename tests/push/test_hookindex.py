"""The hook index: which Receiver a path names, blank tokens, and how often Secrets are read."""

from __future__ import annotations

import logging

import pytest

from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.flux.store import ObjectStore
from receiver.metrics import Metrics
from receiver.push.hookindex import HookIndex
from receiver.signatures import hook_digest
from receiver.web.app import url_normaliser
from tests.conftest import FLEET, GITEA_TOKEN, make_settings

pytestmark = pytest.mark.anyio

GITEA = ObjectKey("Receiver", "flux-system", "gitea")
SECRET = ("flux-system", "gitea-token")
SECRET_TTL = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_index(**kwargs: object) -> tuple[HookIndex, MemoryCluster, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    # The fake caches Secrets as the Kubernetes backend does, on the same clock as the index.
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(make_settings())), FLEET,
                                           secret_ttl_seconds=SECRET_TTL, clock=clock)
    return HookIndex(cluster, clock=clock, metrics=metrics, **kwargs), cluster, clock, metrics  # type: ignore[arg-type]


def gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("gfb_receivers_unusable")


@pytest.mark.parametrize("blank", [b"", b" ", b"\n", b" \t\r\n "])
async def test_a_blank_token_makes_the_receiver_unusable(
    blank: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    index, cluster, _, metrics = make_index()
    cluster.secrets[SECRET] = {"token": blank}
    with caplog.at_level(logging.WARNING, logger="receiver.push.hookindex"):
        await index.refresh_all()
    # The path anyone can compute (sha256(name + namespace) for an empty token) leads nowhere.
    token = blank.decode()
    assert index.lookup(hook_digest(token, "gitea", "flux-system")) is None
    assert await index.lookup_or_refresh(hook_digest(token, "gitea", "flux-system")) is None
    assert index.token_of(GITEA) is None
    assert index.unusable() == {"flux-system/gitea": "blank token"}
    assert gauge(metrics) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].__dict__["receiver"] == str(GITEA)
    # A re-read of the same blank token does not warn again.
    with caplog.at_level(logging.WARNING, logger="receiver.push.hookindex"):
        await index.refresh(GITEA)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_a_receiver_becomes_usable_again_when_its_token_is_set() -> None:
    index, cluster, clock, metrics = make_index()
    cluster.secrets[SECRET] = {"token": b"  "}
    await index.refresh_all()
    assert index.unusable() and gauge(metrics) == 1
    cluster.secrets[SECRET] = {"token": GITEA_TOKEN.encode()}
    # Until the cached read expires the blank token stands, as with a real cluster.
    await index.refresh(GITEA)
    assert index.unusable()
    clock.now += SECRET_TTL + 0.1
    await index.refresh(GITEA)
    assert index.unusable() == {} and gauge(metrics) == 0
    assert index.lookup(hook_digest(GITEA_TOKEN, "gitea", "flux-system")) is not None


async def test_a_missing_token_key_is_listed_too() -> None:
    index, cluster, _, _ = make_index()
    cluster.secrets[SECRET] = {"other": b"x"}
    await index.refresh_all()
    assert index.unusable() == {"flux-system/gitea": "no token"}


async def test_fresh_reads_after_a_failed_signature_are_throttled_per_receiver() -> None:
    index, cluster, clock, _ = make_index(fresh_read_seconds=5.0)
    await index.refresh_all()
    before = cluster.secret_reads
    for _ in range(100):
        assert await index.refresh(GITEA, fresh=True) == GITEA_TOKEN
    assert cluster.secret_reads == before + 1
    # Another Receiver has a budget of its own.
    await index.refresh(ObjectKey("Receiver", "apps", "actions"), fresh=True)
    assert cluster.secret_reads == before + 2
    # After the interval a rotated token is read again.
    cluster.secrets[SECRET] = {"token": b"rotated"}
    clock.now += 4.9
    assert await index.refresh(GITEA, fresh=True) == GITEA_TOKEN
    clock.now += 0.2
    assert await index.refresh(GITEA, fresh=True) == "rotated"
    assert cluster.secret_reads == before + 3
