"""One retry policy: exponential backoff with jitter until a deadline (or an attempt budget).

Everything that waits for something outside the process (an agent to answer,
a metadata service to come up, a 409 Conflict to clear, a cloud resource to
stop being "in use") retries through this module instead of a hand-written
sleep loop:

- ``retry_until`` for asyncio code; an attempt still running at the deadline
  is cancelled.
- ``retry_call``, its blocking twin, for the synchronous image builder and
  process-user-data (boto3 waiters, azure-core pollers, urllib). It cannot
  cancel a running attempt, so the attempt bounds itself.

Both drive the same ``_Attempts`` bookkeeping, so they agree on when to give
up: an attempt starts only before the deadline and within the attempt budget;
a failure that ``retryable`` rejects propagates at once; a retryable one is
followed by the next backoff delay (clamped to the deadline). When the budget
runs out they raise ``RetryTimeout`` carrying the last failure.

botocore, azure-core and kubernetes_asyncio already retry throttling and 5xx
inside each call; this policy is for states that take time to change.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

T = TypeVar("T")

Retryable = Callable[[BaseException], bool]
OnRetry = Callable[[BaseException, float], None]  # (the failure, the pause before the next attempt)


def any_exception(exc: BaseException) -> bool:
    """The default classification: every ``Exception`` is worth another attempt."""
    return isinstance(exc, Exception)


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.2  # fraction of each delay added at random

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (1 + random.uniform(0, self.jitter))
            delay = min(delay * self.factor, self.maximum)


class RetryTimeout(Exception):
    """The deadline passed (or the attempts ran out); ``last_error`` is the final attempt's failure."""

    def __init__(self, attempts: int, elapsed: float, last_error: BaseException | None) -> None:
        super().__init__(f"gave up after {attempts} attempts in {elapsed:.1f}s: {last_error}")
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error


class _Attempts:
    """The loop's bookkeeping, shared by the async and the blocking driver: deadline, budget, delays, last error."""

    def __init__(self, timeout: float | None, attempts: int | None, backoff: Backoff, retryable: Retryable,
                 on_retry: OnRetry | None, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.start = clock()
        self.deadline = None if timeout is None else self.start + timeout
        self.limit = attempts
        self.delays = backoff.delays()
        self.retryable = retryable
        self.on_retry = on_retry
        self.count = 0
        self.last_error: BaseException | None = None

    def remaining(self) -> float | None:
        """Seconds to the deadline (negative once past it); None without a deadline."""
        return None if self.deadline is None else self.deadline - self.clock()

    def _exhausted(self) -> bool:
        left = self.remaining()
        return (left is not None and left <= 0) or (self.limit is not None and self.count >= self.limit)

    def begin(self) -> bool:
        """Whether another attempt may start; counts it when it may."""
        if self._exhausted():
            return False
        self.count += 1
        return True

    def failed(self, exc: BaseException) -> float | None:
        """Record a failed attempt: the pause before the next one, or None when ``exc`` must propagate."""
        if not self.retryable(exc):
            return None
        self.last_error = exc
        if self._exhausted():
            return 0.0  # no next attempt: do not sleep for nothing
        delay = next(self.delays)
        left = self.remaining()
        if left is not None:
            delay = min(delay, max(0.0, left))
        if self.on_retry is not None:
            self.on_retry(exc, delay)
        return delay

    def gave_up(self) -> RetryTimeout:
        return RetryTimeout(self.count, self.clock() - self.start, self.last_error)


async def retry_until(
    timeout: float | None,
    attempt: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff = Backoff(),
    retryable: Retryable = any_exception,
    attempts: int | None = None,
    on_retry: OnRetry | None = None,
) -> T:
    """Call ``attempt`` until it succeeds, ``timeout`` seconds have passed or ``attempts`` calls failed.

    An attempt still running at the deadline is cancelled. Errors for which
    ``retryable`` is false propagate at once; otherwise ``RetryTimeout``
    (``timeout=None``: no deadline, only the attempt budget). Blocks the
    caller, not the event loop.
    """
    loop = asyncio.get_running_loop()
    state = _Attempts(timeout, attempts, backoff, retryable, on_retry, loop.time)
    while state.begin():
        try:
            async with asyncio.timeout(state.remaining()):
                return await attempt()
        except TimeoutError as exc:
            left = state.remaining()
            if left is not None and left <= 0:  # our deadline, not the attempt's own timeout
                state.last_error = state.last_error or exc
                break
            pause = state.failed(exc)
            if pause is None:
                raise
        except Exception as exc:
            pause = state.failed(exc)
            if pause is None:
                raise
        await asyncio.sleep(pause)
    raise state.gave_up()


def retry_call(
    attempt: Callable[[], T],
    *,
    timeout: float | None,
    backoff: Backoff = Backoff(),
    retryable: Retryable = any_exception,
    attempts: int | None = None,
    on_retry: OnRetry | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """The blocking twin of ``retry_until``: same policy, same ``RetryTimeout``.

    ``attempt`` is never interrupted, so it must bound its own duration (a
    request timeout); it may overrun the deadline by that much. Blocks.
    """
    state = _Attempts(timeout, attempts, backoff, retryable, on_retry, clock)
    while state.begin():
        try:
            return attempt()
        except Exception as exc:
            pause = state.failed(exc)
            if pause is None:
                raise
        if pause > 0:
            sleep(pause)
    raise state.gave_up()


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first (a loop's pause between passes); True when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), max(seconds, 0))
    except TimeoutError:
        return False
    return True
