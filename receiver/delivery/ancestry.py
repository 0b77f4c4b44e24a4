"""Whether a later commit contains a pushed one: asked of Gitea once per pair, remembered.

`delivery_state.evaluate` takes a `Contains` function and stays pure and synchronous; this is
its shell. A pair nobody has asked about yet answers None at once (the delivery reads
`reconciling`, `CheckingHistory`) and starts one question to Gitea. When the answer arrives,
`on_answer` tells whoever follows that source to evaluate again. Answers are facts about
immutable commits and are kept (bounded); a failed question answers "no" for `retry_seconds`,
so a Gitea outage delays nothing: the delivery reads `superseded`, as with no Gitea to ask,
until Gitea answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from receiver.bounded import BoundedMap
from receiver.flux.objects import FluxObject, ObjectKey

log = logging.getLogger(__name__)

# (source, ours, held) -> True/False; None when no Gitea instance serves the repository.
Ask = Callable[[FluxObject, str, str], Awaitable["bool | None"]]
_Pair = tuple[str, str, str]  # (repository URL, ours, held)


class Ancestry:
    def __init__(self, ask: Ask, on_answer: Callable[[ObjectKey], None], *,
                 max_entries: int = 4096, max_asking: int = 32, retry_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ask = ask
        self._on_answer = on_answer
        self._max_asking = max_asking
        self._retry = retry_seconds
        self._clock = clock
        self._known: BoundedMap[_Pair, bool] = BoundedMap(max_entries)
        self._failed: BoundedMap[_Pair, float] = BoundedMap(max_entries)  # pair -> ask again at
        self._asking: dict[_Pair, asyncio.Task[None]] = {}

    def contains(self, source: FluxObject, ours: str, held: str) -> bool | None:
        """`delivery_state.Contains`: the answer if known, else None while Gitea is asked."""
        url = source.spec.get("url")
        if not isinstance(url, str) or not url:
            return False
        pair = (url, ours.lower(), held.lower())
        known = self._known.get(pair)
        if known is not None:
            return known
        retry_at = self._failed.get(pair)
        if retry_at is not None and self._clock() < retry_at:
            return False
        if pair in self._asking:
            return None
        if len(self._asking) >= self._max_asking:
            return False  # a burst of distinct pairs: answer as if no Gitea could be asked
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        task = loop.create_task(self._question(pair, source))
        self._asking[pair] = task
        return None

    async def _question(self, pair: _Pair, source: FluxObject) -> None:
        try:
            answer = await self._ask(source, pair[1], pair[2])
        except Exception as exc:  # Gitea down, token unreadable: answer "no" for a while
            log.warning("cannot tell whether a commit contains another",
                        extra={"object": str(source.key), "commit": pair[1][:12],
                               "held": pair[2][:12], "error": type(exc).__name__})
            self._failed[pair] = self._clock() + self._retry
        else:
            self._known[pair] = bool(answer)
            self._failed.pop(pair, None)
        finally:
            self._asking.pop(pair, None)
        self._on_answer(source.key)

    async def stop(self) -> None:
        tasks = list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
