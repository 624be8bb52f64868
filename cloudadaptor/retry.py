"""One retry policy: exponential backoff with jitter until a deadline.

Everything that waits for something outside the process (an agent to answer,
a metadata service to come up) retries through ``retry_until`` instead of a
hand-written sleep loop.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

T = TypeVar("T")


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
    """The deadline passed; ``last_error`` is the final attempt's failure."""

    def __init__(self, attempts: int, elapsed: float, last_error: BaseException | None) -> None:
        super().__init__(f"gave up after {attempts} attempts in {elapsed:.1f}s: {last_error}")
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error


async def retry_until(
    timeout: float,
    attempt: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff = Backoff(),
    retryable: Callable[[BaseException], bool] = lambda exc: isinstance(exc, Exception),
) -> T:
    """Call ``attempt`` until it succeeds or ``timeout`` seconds have passed.

    An attempt still running at the deadline is cancelled. Errors for which
    ``retryable`` is false propagate at once; otherwise ``RetryTimeout``.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    last_error: BaseException | None = None
    attempts = 0
    for delay in backoff.delays():
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        attempts += 1
        try:
            async with asyncio.timeout(remaining):
                return await attempt()
        except TimeoutError as exc:
            if loop.time() >= deadline:
                last_error = last_error or exc
                break
            if not retryable(exc):
                raise
            last_error = exc
        except Exception as exc:
            if not retryable(exc):
                raise
            last_error = exc
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
    raise RetryTimeout(attempts, loop.time() - start, last_error)
