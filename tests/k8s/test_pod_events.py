"""PodVMCreating names the instance and its type; the phase clock splits the create into accepted and running."""

from __future__ import annotations

import asyncio

from cloudadaptor.adaptor.hooks import NoopRecorder, PhaseClock
from cloudadaptor.k8s.events import PodEvents
from fakes.kubeapi import EVENTS


async def test_pod_vm_creating_names_the_instance_and_its_type(api, kubeapi):
    events = PodEvents(api, node_name="worker-1")
    await events.vm_created("s" * 64, "default", "web", "i-0abc", "aws", instance_type="t3.medium")
    for _ in range(100):
        stored = kubeapi.store.list(EVENTS, "default", "", "")
        if stored:
            break
        await asyncio.sleep(0.02)
    await events.close()
    [event] = stored
    assert event["reason"] == "PodVMCreating" and "i-0abc (t3.medium)" in event["message"], event["message"]


class _Phases(NoopRecorder):
    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    def phase_done(self, phase: str, seconds: float, ok: bool = True) -> None:
        self.done.append((phase, seconds))


def test_the_create_splits_into_accepted_and_running_and_an_unsplit_one_is_all_create():
    recorder = _Phases()
    clock = PhaseClock(recorder)
    clock._last -= 3.0  # three seconds since StartVM began
    clock.split("create_instance", 1.0, "instance_running")
    (first, head), (second, rest) = recorder.done
    assert (first, second) == ("create_instance", "instance_running")
    assert head == 1.0 and 1.9 < rest < 2.5, recorder.done
    recorder.done.clear()
    clock._last -= 2.0
    clock.split("create_instance", None, "instance_running")  # the provider returned a running VM
    (_, head), (_, rest) = recorder.done
    assert 1.9 < head < 2.5 and rest == 0.0, recorder.done
