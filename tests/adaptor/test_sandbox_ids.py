"""Sandbox ids are containerd identifiers; nothing else reaches the pods directory (issue 11 item 7),
and the per-sandbox lock map and GetInfo waits are bounded (item 8)."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.adaptor.locks import KeyedLocks
from cloudadaptor.adaptor.validation import validate_sandbox_id
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.ttrpc.errors import Code

TRICKY = [".", "..", "", "a/b", "/abs", "-leading-dash", "_under", ".hidden", "x\x00y", "a" * 129,
          "caf\u00e9", "\u0661\u0662", "a b", "a\nb", "a\\b", "a:b", "\u2024"]
GOOD = ["a", "0", "A.b-c_d", "a..b", "a" * 128, "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]


@pytest.mark.parametrize("bad_id", TRICKY)
def test_tricky_ids_are_refused_with_what_is_expected(bad_id):
    with pytest.raises(LifecycleError) as err:
        validate_sandbox_id(bad_id)
    assert err.value.code == Code.INVALID_ARGUMENT
    assert "sandbox id" in err.value.message, err.value.message


@pytest.mark.parametrize("good_id", GOOD)
def test_containerd_ids_pass(good_id):
    validate_sandbox_id(good_id)


@pytest.mark.parametrize("bad_id", [".", ".."])
async def test_dot_ids_touch_no_pod_socket_or_dir(lifecycle_factory, netns_file, short_dir, bad_id):
    lifecycle = lifecycle_factory(agent_port=1)
    other = await lifecycle.create("b" * 64, shim_annotations("other", "prod"), netns_file)
    pods_before = sorted(os.listdir(short_dir / "pods"))
    for call in (lambda: lifecycle.create(bad_id, shim_annotations("p", "ns"), netns_file),
                 lambda: lifecycle.start(bad_id), lambda: lifecycle.stop(bad_id)):
        with pytest.raises(LifecycleError) as err:
            await call()
        assert err.value.code == Code.INVALID_ARGUMENT, err.value.message
    assert (short_dir / "pods").is_dir(), "the pods directory itself must survive"
    assert sorted(os.listdir(short_dir / "pods")) == pods_before
    assert os.path.isdir(os.path.dirname(other)), "another pod's socket directory was touched"
    assert [s.id for s in lifecycle.store.all()] == ["b" * 64]


async def test_lock_map_does_not_grow_with_unknown_ids(lifecycle_factory):
    lifecycle = lifecycle_factory(agent_port=1)
    for n in range(200):
        with pytest.raises(LifecycleError):
            await lifecycle.stop(f"unknown-{n}")
    assert len(lifecycle._locks) == 0, "locks of finished calls must be dropped"


async def test_keyed_locks_serialize_one_key_and_drop_it_after_the_last_user():
    locks = KeyedLocks()
    order: list[str] = []
    first_in = asyncio.Event()

    async def user(name: str, hold: float) -> None:
        async with locks.hold("k"):
            order.append(f"{name}+")
            first_in.set()
            await asyncio.sleep(hold)
            order.append(f"{name}-")

    first = asyncio.create_task(user("a", 0.05))
    await first_in.wait()
    second = asyncio.create_task(user("b", 0))
    await asyncio.sleep(0)
    assert len(locks) == 1
    await asyncio.gather(first, second)
    assert order == ["a+", "a-", "b+", "b-"]
    assert len(locks) == 0


async def test_getinfo_wait_without_deadline_is_bounded(lifecycle_factory):
    lifecycle = lifecycle_factory(agent_port=1)
    lifecycle.options = dataclasses.replace(lifecycle.options, getinfo_wait=0.2)
    with pytest.raises(LifecycleError) as err:
        await asyncio.wait_for(lifecycle.vm_id_of_pod("prod", "nobody", wait=True), 10)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert "GETINFO_WAIT_TIMEOUT" in err.value.message
