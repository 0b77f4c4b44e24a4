"""Which Receiver a `/hook/<digest>` path names, kept current as Receivers and tokens change.

The digest needs the Receiver's token, which lives in a Secret the bridge may only `get`. The
index is rebuilt for one Receiver whenever it changes in the cache, for all of them on an
unknown path (at most every `miss_refresh_seconds`, so a scan of random paths cannot turn into
a flood of Secret reads), and a Receiver's token is re-read once when a signature fails, so a
rotated token works without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from receiver.flux.cluster import Cluster, ClusterError, secret_token
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.signatures import hook_digest

SUPPORTED_TYPES = frozenset({"github", "generic", "generic-hmac"})
log = logging.getLogger(__name__)


class HookIndex:
    def __init__(
        self,
        cluster: Cluster,
        *,
        miss_refresh_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cluster = cluster
        self._by_digest: dict[str, ObjectKey] = {}
        self._digest_of: dict[ObjectKey, str] = {}
        self._tokens: dict[ObjectKey, str] = {}
        self._miss_refresh = miss_refresh_seconds
        self._clock = clock
        self._last_full = -1e9
        self._pending: set[asyncio.Task[str | None]] = set()

    def __len__(self) -> int:
        return len(self._by_digest)

    def on_store_change(self, op: str, obj: FluxObject) -> None:
        """Store listener: re-index a Receiver that was added, changed or removed."""
        if obj.kind != "Receiver":
            return
        if op == "delete":
            self._drop(obj.key)
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

    async def refresh(self, key: ObjectKey, *, fresh: bool = False) -> str | None:
        """Re-read one Receiver's token and re-index it; returns the token."""
        obj = self._cluster.store.get(key)
        if obj is None:
            self._drop(key)
            return None
        if obj.spec.get("type") not in SUPPORTED_TYPES:
            self._drop(key)
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
        if token is None:
            log.warning("receiver has no usable token", extra={"receiver": str(key)})
            return None
        digest = hook_digest(token, obj.name, obj.namespace)
        self._by_digest[digest] = key
        self._digest_of[key] = digest
        self._tokens[key] = token
        return token

    async def refresh_all(self) -> None:
        self._last_full = self._clock()
        keys = [r.key for r in self._cluster.store.list("Receiver")]
        for key in set(self._digest_of) - set(keys):
            self._drop(key)
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

    def digest_of(self, key: ObjectKey) -> str | None:
        return self._digest_of.get(key)

    def token_of(self, key: ObjectKey) -> str | None:
        return self._tokens.get(key)
