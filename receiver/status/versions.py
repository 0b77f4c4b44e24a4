"""What each Gitea instance accepts: `skipped` only from 1.25 on (`receiver.gitea.version`)."""

from __future__ import annotations

import logging
from dataclasses import replace

from receiver.gitea.client import GiteaClient, GiteaError
from receiver.gitea.version import SKIPPED, accepts_skipped, state_for_version
from receiver.status.decisions import DesiredStatus

log = logging.getLogger("receiver.status_service")


class GiteaVersions:
    def __init__(self, client: GiteaClient) -> None:
        self._client = client
        self._known: dict[str, str] = {}  # per instance, once read ("" when Gitea sent none)

    def get(self, instance: str) -> str | None:
        """The version read so far, or None if not read yet."""
        return self._known.get(instance)

    async def read_all(self) -> None:
        """Read every instance's version at start; one that does not answer now is read again
        before a status that depends on it is posted."""
        for name in self._client.instance_names:
            try:
                await self.version(name)
            except GiteaError as exc:
                log.warning("cannot read the Gitea version; asked again before posting a "
                            "skipped status", extra={"instance": name, "error": str(exc)})
            except Exception:
                log.exception("reading the Gitea version crashed", extra={"instance": name})

    async def version(self, instance: str) -> str:
        if instance not in self._known:
            version = await self._client.server_version(instance)
            self._known[instance] = version
            log.info("gitea instance version", extra={
                "instance": instance, "version": version or "unknown",
                "skipped_posted_as": SKIPPED if accepts_skipped(version)
                else state_for_version(SKIPPED, version)})
        return self._known[instance]

    async def for_instance(self, instance: str, status: DesiredStatus) -> DesiredStatus:
        """The status as this instance accepts it (`skipped` only on Gitea >= 1.25)."""
        if status.state != SKIPPED:
            return status
        state = state_for_version(status.state, await self.version(instance))
        return status if state == status.state else replace(status, state=state)
