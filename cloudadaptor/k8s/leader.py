"""Leader election over a ``coordination.k8s.io/v1`` Lease, for controllers that run with replicas > 1.

The way client-go's leaderelection works: a Lease names its ``holderIdentity``
and is renewed every ``renew`` seconds; another replica takes it over only
after it has *itself* seen the same record unchanged for ``duration`` seconds
(its own monotonic clock: no clock skew between machines matters). Every write
carries the ``resourceVersion`` it read, so two replicas never both win a
race (409). A leader that cannot renew for ``deadline`` seconds (less than
``duration``) stops leading before anyone else can start. On a clean stop it
releases the Lease (empty holder) so another replica takes over at once.

Ours rather than kubernetes_asyncio's ``leaderelection``: adapting that one
took as much code as this, patched into its lock — it counts only
``ApiException`` as a failed attempt (a dropped connection ends its ``run``), checks
the renew deadline only after a retry sleep, runs one term and never
releases the Lease.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from typing import Any, Awaitable, Callable

from kubernetes_asyncio import client as k8s

from cloudadaptor.k8s.client import API_ERRORS, describe, is_conflict, is_not_found
from cloudadaptor.retry import wait_or_stop

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """``await run(stop, lead)``: ``lead(until)`` runs while this replica leads; ``until`` is set when it stops."""

    def __init__(self, api: k8s.ApiClient, namespace: str, name: str, identity: str, *,
                 duration: float = 15.0, deadline: float = 10.0, renew: float = 2.0) -> None:
        if not renew < deadline < duration:
            raise ValueError("leader election needs renew < deadline < duration")
        self.coordination = k8s.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.deadline, self.renew = duration, deadline, renew
        self._seen: tuple[Any, float] | None = None  # (the other holder's record, when we first saw it)
        self.leading = False

    async def attempt(self) -> bool:
        """Take or renew the Lease once. True when this replica holds it now. API errors propagate."""
        try:
            lease = await self.coordination.read_namespaced_lease(self.name, self.namespace)
        except Exception as exc:
            if not is_not_found(exc):
                raise
            return await self._write(None, transitions=0, acquired=_micro_now())
        spec = lease.spec
        holder = spec.holder_identity or ""
        if holder and holder != self.identity:
            record = (holder, spec.renew_time, lease.metadata.resource_version)
            if self._seen is None or self._seen[0] != record:
                self._seen = (record, time.monotonic())  # changed: the holder is alive, wait again
                return False
            if time.monotonic() - self._seen[1] < self.duration:  # every replica runs with the same duration
                return False
            log.warning("leader election: %s did not renew Lease %s/%s for %ss; taking over",
                        holder, self.namespace, self.name, spec.lease_duration_seconds)
        ours = holder == self.identity
        transitions = (spec.lease_transitions or 0) + (0 if ours else 1)
        acquired = spec.acquire_time.isoformat() if ours and spec.acquire_time else _micro_now()
        return await self._write(lease.metadata.resource_version, transitions=transitions, acquired=acquired)

    async def _write(self, resource_version: str | None, *, transitions: int, acquired: str, holder: str | None = None) -> bool:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity if holder is None else holder,
                         "leaseDurationSeconds": max(1, math.ceil(self.duration)), "acquireTime": acquired,
                         "renewTime": _micro_now(), "leaseTransitions": transitions}}
        try:
            if resource_version is None:
                await self.coordination.create_namespaced_lease(self.namespace, body)
            else:
                body["metadata"]["resourceVersion"] = resource_version
                await self.coordination.replace_namespaced_lease(self.name, self.namespace, body)
        except Exception as exc:
            if is_conflict(exc):  # another replica wrote first
                return False
            raise
        self._seen = None
        return True

    async def run(self, stop: asyncio.Event, lead: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
        """Until ``stop``: wait for the Lease, lead while holding it, wait again after losing it."""
        while not stop.is_set():
            if await self._attempt_logged():
                await self._lead(stop, lead)
            await wait_or_stop(stop, self.renew)

    async def _attempt_logged(self) -> bool:
        try:
            return await self.attempt()
        except API_ERRORS as exc:
            log.warning("leader election: Lease %s/%s: %s", self.namespace, self.name, describe(exc))
            return False

    async def _lead(self, stop: asyncio.Event, lead: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
        log.info("leader election: %s leads (Lease %s/%s)", self.identity, self.namespace, self.name)
        self.leading = True
        until = asyncio.Event()
        work = asyncio.create_task(lead(until), name="leading")
        renewed = time.monotonic()
        try:
            while not stop.is_set() and not work.done():
                if await wait_or_stop(stop, self.renew):
                    break
                if await self._attempt_logged():
                    renewed = time.monotonic()
                elif time.monotonic() - renewed >= self.deadline:
                    log.error("leader election: Lease %s/%s not renewed for %.0fs: no longer leading",
                              self.namespace, self.name, self.deadline)
                    break
        finally:
            self.leading = False
            until.set()
            await asyncio.gather(work, return_exceptions=True)
        if stop.is_set():
            await self._release()

    async def _release(self) -> None:
        """Hand the Lease back on a clean stop so another replica need not wait ``duration``."""
        try:
            lease = await self.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                await self._write(lease.metadata.resource_version, transitions=lease.spec.lease_transitions or 0,
                                  acquired=_micro_now(), holder="")
        except API_ERRORS as exc:  # the Lease expires by itself
            log.warning("leader election: releasing Lease %s/%s failed: %s", self.namespace, self.name, describe(exc))
