"""SandboxStore: VNI allocation, the pod network column, migration of older databases."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore, VniExhausted, VniInUse
from cloudadaptor.podconfig import PodInterface, PodNetworkConfig
from cloudadaptor.wire import MAX_VNI

NETWORK = PodNetworkConfig(PodInterface("eth0", "02:00:00:00:00:0a", 1500, ("198.51.100.10/24",)), "192.0.2.1", 555000)


def sandbox(sid: str, vni: int = 0, network: PodNetworkConfig | None = None) -> Sandbox:
    return Sandbox(id=sid, pod_name="p", pod_namespace="ns", netns_path="/run/netns/x", vm_name="podvm-x",
                   agent_socket=f"/run/pods/{sid}/agent.ttrpc", vni=vni, pod_network=network)


@pytest.fixture
def store(tmp_path: Path):
    opened = SandboxStore(tmp_path / "state.db")
    yield opened
    opened.close()


def test_next_free_vni_is_the_lowest_unused_from_the_minimum(store):
    assert store.next_free_vni(555000) == 555000
    for sid, vni in (("a", 555000), ("b", 555001), ("c", 555003), ("low", 7)):
        store.add(sandbox(sid, vni))
    assert store.next_free_vni(555000) == 555002
    store.remove("a")
    assert store.next_free_vni(555000) == 555000, "a stopped sandbox's VNI is free again"
    assert store.next_free_vni(555003) == 555004


def test_a_vni_held_by_another_sandbox_is_refused(store):
    store.add(sandbox("a", 555000))
    with pytest.raises(VniInUse, match="555000"):
        store.add(sandbox("b", 555000))
    assert store.add(sandbox("a", 555000))[1] is False, "re-adding the same sandbox is not a conflict"
    store.add(sandbox("c", 0))
    store.add(sandbox("d", 0))  # rows without a tunnel do not collide


def test_vnis_survive_a_reopened_store(tmp_path: Path):
    first = SandboxStore(tmp_path / "state.db")
    first.add(sandbox("a", first.next_free_vni(555000)))
    first.add(sandbox("b", first.next_free_vni(555000)))
    first.close()
    again = SandboxStore(tmp_path / "state.db")
    try:
        assert again.next_free_vni(555000) == 555002
        assert [s.vni for s in again.all()] == [555000, 555001]
    finally:
        again.close()


def test_vnis_run_out_at_the_top_of_the_range(store):
    store.add(sandbox("a", MAX_VNI))
    with pytest.raises(VniExhausted, match=str(MAX_VNI)):
        store.next_free_vni(MAX_VNI)


def test_pod_network_round_trips(store):
    store.add(sandbox("a", 555000, NETWORK))
    assert store.get("a").pod_network == NETWORK
    assert store.update("a", state=SandboxState.RUNNING).pod_network == NETWORK


_OLD_SCHEMA = """CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY, pod_name TEXT NOT NULL, pod_namespace TEXT NOT NULL, netns_path TEXT NOT NULL,
    vm_name TEXT NOT NULL, agent_socket TEXT NOT NULL, annotations TEXT NOT NULL, user_data TEXT NOT NULL,
    state TEXT NOT NULL, instance_id TEXT NOT NULL, vm_ips TEXT NOT NULL, error TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL)"""


def test_a_database_from_before_tunnels_is_migrated_and_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(_OLD_SCHEMA)
    db.execute("INSERT INTO sandboxes VALUES ('old', 'p', 'ns', '/run/netns/x', 'podvm-x', '/s', '{}', '', "
               "'running', 'i-1', '[\"192.0.2.5\"]', '', 1.0, 1.0)")
    db.commit()
    db.close()
    store = SandboxStore(path)
    try:
        old = store.get("old")
        assert (old.state, old.instance_id, old.vm_ips, old.vni, old.pod_network) == (
            SandboxState.RUNNING, "i-1", ("192.0.2.5",), 0, None)
        store.add(sandbox("new", store.next_free_vni(555000), NETWORK))
        assert store.get("new").vni == 555000
    finally:
        store.close()
    SandboxStore(path).close()  # opening a migrated database again is a no-op


def test_holding_vms_are_the_starting_running_and_instance_holding_rows(store):
    states = {"created": SandboxState.CREATED, "starting": SandboxState.STARTING, "running": SandboxState.RUNNING,
              "stopping": SandboxState.STOPPING, "failed": SandboxState.FAILED}
    for sid, state in states.items():
        store.add(sandbox(sid))
        store.change(sid, state=state)
    store.add(sandbox("stopping-with-vm"))
    store.change("stopping-with-vm", state=SandboxState.STOPPING, instance_id="i-1", vm_ips=("192.0.2.7",))
    expected = {s.id for s in store.all() if s.state in (SandboxState.STARTING, SandboxState.RUNNING) or s.instance_id}
    assert store.holding_vms() == expected == {"starting", "running", "stopping-with-vm"}


def test_change_writes_what_update_returns_and_refuses_what_update_refuses(store):
    store.add(sandbox("a"))
    assert store.change("a", state=SandboxState.RUNNING, vm_ips=("192.0.2.7",)) is None
    got = store.get("a")
    assert got is not None and got.state is SandboxState.RUNNING and got.vm_ips == ("192.0.2.7",)
    assert store.update("a", error="x") == store.get("a")
    with pytest.raises(KeyError):
        store.change("nobody", error="x")
    with pytest.raises(ValueError, match="created_at"):
        store.change("a", created_at=1.0)


def test_pod_of_is_what_get_says(store):
    store.add(sandbox("a", network=NETWORK))
    store.change("a", instance_id="i-1")
    got = store.get("a")
    assert got is not None and store.pod_of("a") == (got.pod_namespace, got.pod_name, "i-1")
    assert store.pod_of("nobody") is None


def test_every_commit_survives_a_killed_writer(tmp_path: Path):
    """Commits are not fsynced (synchronous=NORMAL): a SIGKILLed daemon must still leave each one."""
    path = tmp_path / "state.db"
    pid = os.fork()
    if pid == 0:  # the writer: commits, then dies without closing anything
        try:
            writer = SandboxStore(path)
            writer.add(sandbox("a", 555000))
            writer.change("a", state=SandboxState.RUNNING, instance_id="i-1", vm_ips=("192.0.2.9",))
            writer.add(sandbox("b", 555001))
            writer.remove("b")
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    reopened = SandboxStore(path)
    try:
        assert reopened.connection.execute("PRAGMA synchronous").fetchone()[0] == 1, "NORMAL is what this test covers"
        row = reopened.get("a")
        assert row is not None and (row.state, row.instance_id, row.vm_ips) == (SandboxState.RUNNING, "i-1", ("192.0.2.9",))
        assert reopened.get("b") is None, "the removal was kept too"
    finally:
        reopened.close()
