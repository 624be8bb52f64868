"""The one retry policy: the async ``retry_until`` and its blocking twin ``retry_call`` agree."""

from __future__ import annotations

import asyncio

import pytest

from cloudadaptor.retry import Backoff, RetryTimeout, retry_call, retry_until

FAST = Backoff(initial=0.01, factor=2.0, maximum=0.02, jitter=0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_backoff_doubles_up_to_its_maximum():
    delays = Backoff(initial=1, factor=2, maximum=5, jitter=0).delays()
    assert [next(delays) for _ in range(5)] == [1, 2, 4, 5, 5]


def test_retry_call_sleeps_the_backoff_clamped_to_the_deadline_then_raises_retry_timeout():
    clock = FakeClock()
    failures: list[float] = []

    def never() -> None:
        raise OSError("refused")

    with pytest.raises(RetryTimeout) as caught:
        retry_call(never, timeout=10, backoff=Backoff(initial=1, factor=2, maximum=4, jitter=0),
                   clock=clock, sleep=clock.sleep, on_retry=lambda exc, pause: failures.append(pause))
    assert clock.sleeps == [1, 2, 4, 3], "the last pause ends at the deadline, not past it"
    assert failures == clock.sleeps, "on_retry hears of every pause"
    assert caught.value.attempts == 4 and isinstance(caught.value.last_error, OSError)
    assert caught.value.elapsed == 10


def test_retry_call_with_an_attempt_budget_stops_without_a_last_sleep():
    clock = FakeClock()
    calls: list[int] = []

    def conflict() -> None:
        calls.append(1)
        raise RuntimeError("409")

    with pytest.raises(RetryTimeout, match="after 3 attempts") as caught:
        retry_call(conflict, timeout=None, attempts=3, backoff=Backoff(initial=1, jitter=0), clock=clock,
                   sleep=clock.sleep)
    assert len(calls) == 3 and clock.sleeps == [1, 2]
    assert str(caught.value.last_error) == "409"


def test_retry_call_passes_an_error_that_is_not_retryable_at_once():
    clock = FakeClock()
    with pytest.raises(ValueError, match="bad input"):
        retry_call(lambda: (_ for _ in ()).throw(ValueError("bad input")), timeout=10,
                   retryable=lambda exc: isinstance(exc, OSError), clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []


async def test_retry_until_returns_once_the_attempt_succeeds():
    calls: list[int] = []

    async def third_time_lucky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError()
        return "up"

    assert await retry_until(5, third_time_lucky, backoff=FAST) == "up"
    assert len(calls) == 3


async def test_retry_until_cancels_an_attempt_running_at_the_deadline():
    async def hang() -> None:
        await asyncio.sleep(30)

    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(RetryTimeout) as caught:
        await retry_until(0.2, hang, backoff=FAST)
    assert loop.time() - began < 2
    assert caught.value.attempts == 1 and isinstance(caught.value.last_error, TimeoutError)


async def test_retry_until_and_retry_call_agree_on_the_attempt_budget_and_classification():
    async def conflict() -> None:
        raise RuntimeError("409")

    with pytest.raises(RetryTimeout) as caught:
        await retry_until(None, conflict, backoff=FAST, attempts=4)
    assert caught.value.attempts == 4

    async def forbidden() -> None:
        raise PermissionError("403")

    with pytest.raises(PermissionError):
        await retry_until(5, forbidden, backoff=FAST, retryable=lambda exc: isinstance(exc, RuntimeError))
