"""RFC 3339 as Kubernetes, Flux and Gitea write it, and the one backoff schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from receiver.retry import Backoff, backoff_delay
from receiver.times import epoch_seconds, parse_rfc3339

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def test_every_form_the_bridge_reads() -> None:
    assert epoch_seconds("2023-11-14T22:13:20Z") == T0
    assert epoch_seconds("2023-11-14T22:13:20.123456789Z") == T0 + 0.123456  # Flux: nanoseconds
    assert epoch_seconds("2023-11-14T22:13:20.5Z some-id") == T0 + 0.5  # text after a space
    assert epoch_seconds("2023-11-14T23:13:20+01:00") == T0  # Gitea: an offset
    assert epoch_seconds("2023-11-14T23:13:20.25+01:00") == T0 + 0.25
    assert epoch_seconds("2023-11-14T22:13:20") == T0  # no zone: UTC
    assert parse_rfc3339("2023-11-14T22:13:20.000001Z") == datetime(
        2023, 11, 14, 22, 13, 20, 1, tzinfo=UTC)


def test_what_is_not_a_time_is_none() -> None:
    for value in ("", " ", "yesterday", "2023-13-40T00:00:00Z", None, 17, b"2023-11-14"):
        assert parse_rfc3339(value) is None, value


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))])))
def test_what_isoformat_writes_is_read_back(moment: datetime) -> None:
    assert parse_rfc3339(moment.isoformat()) == moment


def test_backoff_grows_to_its_cap_within_the_upper_half() -> None:
    assert backoff_delay(1, 1.0, 30.0, lambda: 0.0) == 0.5
    assert backoff_delay(1, 1.0, 30.0, lambda: 1.0) == 1.0
    assert backoff_delay(4, 1.0, 30.0, lambda: 1.0) == 8.0
    assert backoff_delay(20, 1.0, 30.0, lambda: 1.0) == 30.0
    assert all(0.05 <= Backoff(0.1, 2.0).delay(1) <= 0.1 for _ in range(50))
