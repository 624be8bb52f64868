"""Leader election over a Lease (k8s/leader.py) against the local Kubernetes API: one replica leads,
a stopped leader hands over at once, a silent one after the lease duration."""

from __future__ import annotations

import asyncio

import pytest

from cloudadaptor.k8s.leader import LeaderElector
from fakes.kubeapi import LEASES

NS = "openshift-sandboxed-containers-operator"


def elector(api, identity: str) -> LeaderElector:
    return LeaderElector(api, NS, "peerpod-controller", identity, duration=0.6, deadline=0.4, renew=0.05)


async def test_one_of_two_replicas_leads_and_a_stopped_leader_hands_over(api, kubeapi):
    leading: list[str] = []

    def lead_as(name: str):
        async def lead(until: asyncio.Event) -> None:
            leading.append(name)
            await until.wait()
            leading.remove(name)
        return lead

    stops = {name: asyncio.Event() for name in ("a", "b")}
    first = asyncio.create_task(elector(api, "a").run(stops["a"], lead_as("a")))
    await _until(lambda: leading == ["a"])
    second = asyncio.create_task(elector(api, "b").run(stops["b"], lead_as("b")))
    await asyncio.sleep(1.0)  # longer than the lease: a renewing leader keeps it
    assert leading == ["a"], "never two leaders"
    lease = kubeapi.get(LEASES, "peerpod-controller", NS)
    assert lease["spec"]["holderIdentity"] == "a"
    stops["a"].set()
    await first
    await _until(lambda: leading == ["b"])
    assert kubeapi.get(LEASES, "peerpod-controller", NS)["spec"]["holderIdentity"] == "b"
    stops["b"].set()
    await second
    assert kubeapi.get(LEASES, "peerpod-controller", NS)["spec"]["holderIdentity"] == "", "released on a clean stop"


async def test_a_leader_that_stops_renewing_is_replaced_after_the_lease_duration(api, kubeapi):
    silent = elector(api, "silent")
    assert await silent.attempt()
    other = elector(api, "other")
    assert not await other.attempt(), "the holder is alive as far as anyone knows"
    await asyncio.sleep(0.7)
    assert await other.attempt(), "the record did not change for the whole lease duration"
    assert kubeapi.get(LEASES, "peerpod-controller", NS)["spec"]["leaseTransitions"] == 1


def test_timings_must_leave_the_leader_time_to_step_down(api):
    with pytest.raises(ValueError):
        LeaderElector(api, NS, "x", "me", duration=5, deadline=10, renew=1)


async def _until(check, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)
