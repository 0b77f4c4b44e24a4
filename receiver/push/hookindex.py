"""Which Receiver a `/hook/<digest>` path names, kept current as Receivers and tokens change.

The digest needs the Receiver's token, which lives in a Secret the bridge may only `get`. The
index is rebuilt for one Receiver whenever it changes in the cache, for all of them on an
unknown path (at most every `miss_refresh_seconds`, so a scan of random paths cannot turn into
a flood of Secret reads), and a Receiver's token is re-read when a signature fails, so a
rotated token works without a restart: at most once per `fresh_read_seconds` per Receiver, so a
flood of wrong signatures cannot become a flood of Secret reads either.

A token that is empty or only whitespace is no secret: its hook path is sha256(name +
namespace), which anyone can compute, and an HMAC under an empty key is no proof. Such a
Receiver is unusable, exactly like one without a Secret: its path answers 404. It is logged (a
warning, never the token), counted in a gauge, and listed by `unusable()` for `/readyz`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING

from receiver.flux.cluster import Cluster, ClusterError, secret_token
from receiver.flux.event_book import EventNote
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.push.push_events import token_note, type_note
from receiver.signatures import hook_digest

if TYPE_CHECKING:
    from receiver.metrics import Metrics

SUPPORTED_TYPES = frozenset({"github", "generic", "generic-hmac"})
log = logging.getLogger(__name__)


def usable_token(token: str | None) -> bool:
    """A token that proves something: present, with at least one visible character (not only
    spaces, controls such as NUL, or invisible format characters such as U+200B)."""
    return token is not None and any(
        not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in token)


class HookIndex:
    def __init__(
        self,
        cluster: Cluster,
        *,
        miss_refresh_seconds: float = 5.0,
        fresh_read_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._cluster = cluster
        self._by_digest: dict[str, ObjectKey] = {}
        self._digest_of: dict[ObjectKey, str] = {}
        self._tokens: dict[ObjectKey, str] = {}
        self._miss_refresh = miss_refresh_seconds
        self._fresh_read = fresh_read_seconds
        self._fresh_at: dict[ObjectKey, float] = {}
        self._clock = clock
        self._metrics = metrics
        self._last_full = -1e9
        self._pending: set[asyncio.Task[str | None]] = set()
        # Receivers whose Secret holds a blank token (value: why), for /readyz and the gauge.
        self._unusable: dict[ObjectKey, str] = {}
        # Told what a Receiver cannot be used for (a Kubernetes Event on it; set by the app).
        self.events: Callable[[EventNote], None] = lambda note: None

    def __len__(self) -> int:
        return len(self._by_digest)

    def on_store_change(self, op: str, obj: FluxObject) -> None:
        """Store listener: re-index a Receiver that was added, changed or removed."""
        if obj.kind != "Receiver":
            return
        if op == "delete":
            self._drop(obj.key)
            self._forget(obj.key)
            return
        try:
            task = asyncio.get_running_loop().create_task(self.refresh(obj.key))
        except RuntimeError:  # no loop yet (loading manifests): start() indexes everything
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _drop(self, key: ObjectKey) -> None:
        digest = self._digest_of.pop(key, None)
        if digest is not None and self._by_digest.get(digest) == key:
            del self._by_digest[digest]
        self._tokens.pop(key, None)

    def _forget(self, key: ObjectKey) -> None:
        """The Receiver is gone: nothing about it is kept."""
        self._fresh_at.pop(key, None)
        self._set_unusable(key, None)

    def _set_unusable(self, key: ObjectKey, why: str | None) -> None:
        if why is None:
            self._unusable.pop(key, None)
        else:
            self._unusable[key] = why
        if self._metrics is not None:
            self._metrics.receivers_unusable.set(len(self._unusable))

    async def refresh(self, key: ObjectKey, *, fresh: bool = False) -> str | None:
        """Re-read one Receiver's token and re-index it; returns the token.

        `fresh` (after a signature failed) bypasses the Secret cache, but at most once per
        `fresh_read_seconds` per Receiver; within that time the token already held is returned.
        """
        if fresh:
            now = self._clock()
            last = self._fresh_at.get(key)
            if last is not None and now - last < self._fresh_read:
                return self._tokens.get(key)
            self._fresh_at[key] = now
        obj = self._cluster.store.get(key)
        if obj is None:
            self._drop(key)
            self._forget(key)
            return None
        if obj.spec.get("type") not in SUPPORTED_TYPES:
            self._drop(key)
            self._set_unusable(key, None)
            self.events(type_note(obj))
            return None
        secret_name = (obj.spec.get("secretRef") or {}).get("name")
        token: str | None = None
        if isinstance(secret_name, str) and secret_name:
            try:
                data = await self._cluster.read_secret(obj.namespace, secret_name, fresh=fresh)
            except ClusterError as exc:
                log.warning("cannot read receiver secret", extra={"receiver": str(key),
                                                                  "error": str(exc)})
                return self._tokens.get(key)
            token = secret_token(data)
        self._drop(key)
        if token is None or not usable_token(token):
            why = "no token" if token is None else "blank token"
            if self._unusable.get(key) != why:
                # Once per change, not on every re-read; the token itself is never logged.
                log.warning("receiver has no usable token: its path answers 404", extra={
                    "receiver": str(key), "reason": why})
            self._set_unusable(key, why)
            self.events(token_note(obj, "no token" if token is None else "blank token"))
            return None
        self._set_unusable(key, None)
        digest = hook_digest(token, obj.name, obj.namespace)
        self._by_digest[digest] = key
        self._digest_of[key] = digest
        self._tokens[key] = token
        return token

    async def refresh_all(self) -> None:
        self._last_full = self._clock()
        keys = [r.key for r in self._cluster.store.list("Receiver")]
        for key in (set(self._digest_of) | set(self._unusable)) - set(keys):
            self._drop(key)
            self._forget(key)
        await asyncio.gather(*(self.refresh(k) for k in keys))

    def lookup(self, digest: str) -> tuple[FluxObject, str] | None:
        key = self._by_digest.get(digest)
        if key is None:
            return None
        obj = self._cluster.store.get(key)
        token = self._tokens.get(key)
        if obj is None or token is None:
            return None
        return obj, token

    async def lookup_or_refresh(self, digest: str) -> tuple[FluxObject, str] | None:
        found = self.lookup(digest)
        if found is None and self._pending:
            # Receivers being indexed right now (at start-up, or just created or changed):
            # their Secrets are being read. Wait for them before answering 404.
            await asyncio.wait(set(self._pending), timeout=self._miss_refresh)
            found = self.lookup(digest)
        if found is None and self._clock() - self._last_full >= self._miss_refresh:
            await self.refresh_all()
            found = self.lookup(digest)
        return found

    @property
    def indexing(self) -> bool:
        """Some Receiver's Secret is being read right now."""
        return bool(self._pending)

    def token_of(self, key: ObjectKey) -> str | None:
        return self._tokens.get(key)

    def unusable(self) -> dict[str, str]:
        """`namespace/name` -> why, for every Receiver whose Secret holds no usable token
        (missing or blank `token` key). Names only: never a token."""
        return {f"{k.namespace}/{k.name}": why for k, why in sorted(self._unusable.items())}
