"""The secrets the status side is configured with: read once per `secret_cache_seconds`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from receiver.config import ConfigError, SecretSource, Settings
from receiver.flux.cluster import Cluster
from receiver.secret_files import read_secret_file

log = logging.getLogger("receiver.status_service")


class SecretReader:
    def __init__(self, settings: Settings, cluster: Cluster, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._cluster = cluster
        self._clock = clock
        self._cache: dict[SecretSource, tuple[float, str]] = {}

    async def read(self, source: SecretSource, fresh: bool = False) -> str:
        """A secret's value, cached for `secret_cache_seconds` (rotation is picked up)."""
        now = self._clock()
        cached = self._cache.get(source)
        if cached is not None and not fresh and now < cached[0]:
            return cached[1]
        if source.file is not None:
            value = read_secret_file(source.file)
        else:
            namespace, _, name = (source.secret or "").partition("/")
            data = await self._cluster.read_secret(namespace, name, fresh=fresh)
            if data is None or source.key not in data:
                raise ConfigError(f"secret {source.secret} has no key {source.key}")
            value = data[source.key].decode()
        self._cache[source] = (now + self._settings.secret_cache_seconds, value)
        return value

    async def read_or_none(self, source: SecretSource | None) -> str | None:
        """The value, or None when unset, unreadable (logged without the value) or blank."""
        if source is None:
            return None
        try:
            value = await self.read(source)
        except (ConfigError, UnicodeDecodeError) as exc:
            log.error("cannot read a secret", extra={"error": str(exc)})
            return None
        return value or None

    def configured(self) -> list[tuple[str, SecretSource]]:
        """(setting, source) of every secret the configuration names, settings spelled as in
        the configuration file (`gitea[eu].token`)."""
        settings = self._settings
        found: list[tuple[str, SecretSource | None]] = [
            (f"gitea[{instance.name}].token", instance.token) for instance in settings.gitea]
        found += [("events.hmac_token", settings.events.hmac_token),
                  ("events.bearer_token", settings.events.bearer_token),
                  ("badge_key", settings.badge_key)]
        return [(setting, source) for setting, source in found if source is not None]

    async def unreadable(self) -> dict[str, str]:
        """setting -> why it cannot be used now, for every configured secret that cannot be read
        or is blank. The reason names the file or Secret, never a value."""
        problems: dict[str, str] = {}
        for setting, source in self.configured():
            try:
                value = await self.read(source)
            except ConfigError as exc:
                problems[setting] = str(exc)
                continue
            except UnicodeDecodeError:
                problems[setting] = f"secret {source.secret} key {source.key} is not UTF-8 text"
                continue
            except Exception as exc:  # a Kubernetes API error: reported, not raised
                problems[setting] = f"cannot read secret {source.secret}: {type(exc).__name__}"
                continue
            if not value.strip():
                self._cache.pop(source, None)  # read again next time: it may be written soon
                where = source.file if source.file is not None else (
                    f"secret {source.secret} key {source.key}")
                problems[setting] = f"{where} is empty"
        return problems
