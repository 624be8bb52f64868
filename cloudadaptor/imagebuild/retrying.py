"""Retrying a blocking cloud call on a known transient condition, with the adaptor's backoff.

The async code retries through ``cloudadaptor.retry.retry_until``; the image
builder is synchronous (boto3 waiters, azure-core pollers, paramiko) and
uses this, with the same ``Backoff`` delays. botocore and azure-core already
retry throttling and 5xx inside each call; this is only for resource states
such as "the security group is still in use".
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from cloudadaptor.retry import Backoff

T = TypeVar("T")


def retry_call(fn: Callable[[], T], *, timeout: float, interval: float, retryable: Callable[[BaseException], bool],
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, called again while it raises a ``retryable`` error and ``timeout`` seconds have not passed.

    Delays start at ``interval`` and double up to 10x it (jittered). The
    last error propagates once the time is up; other errors at once.
    """
    deadline = clock() + timeout
    delays = Backoff(initial=interval, factor=2.0, maximum=max(interval * 10, interval)).delays()
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = next(delays)
            if not retryable(exc) or clock() + delay > deadline:
                raise
            sleep(delay)
