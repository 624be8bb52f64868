"""The warm pool's keys (``PODVM_POOL_*``) and their cross checks; listed by ``config.common_keys()``.

Kept apart from ``config.py`` like ``config_security``: the pool's rules read in one place.
"""

from __future__ import annotations

from typing import Any, Mapping

from cloudadaptor.config import Key, Problem
from cloudadaptor.parsers import int_range, parse_positive_duration

POOL_KEYS = ("PODVM_POOL_SIZE", "PODVM_POOL_MAX_AGE", "PODVM_POOL_REFILL_CONCURRENCY")


def pool_keys() -> tuple[Key, ...]:
    return (
        Key("PODVM_POOL_SIZE", int_range(0, 1000), 0,
            help="pod VMs kept booted and ready on this node for fast starts (0: no pool); idle VMs are billed"),
        Key("PODVM_POOL_MAX_AGE", parse_positive_duration, 86400.0,
            help="a ready pool VM older than this is replaced"),
        Key("PODVM_POOL_REFILL_CONCURRENCY", int_range(1, 100), 2,
            help="pool VMs created at once while refilling"),
    )


def pool_problems(values: Mapping[str, Any]) -> list[Problem]:
    """A pool VM is claimed over mutual TLS only: no pool with DISABLE_TLS."""
    if values.get("PODVM_POOL_SIZE") and values.get("DISABLE_TLS"):
        return [Problem("PODVM_POOL_SIZE", str(values["PODVM_POOL_SIZE"]),
                        "0 when DISABLE_TLS is true (pool VMs take their pod only over mutual TLS)")]
    return []
