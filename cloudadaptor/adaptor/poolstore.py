"""PoolStore: the warm pool's VMs, in the sandbox store's database.

A pool VM is in exactly one place at any instant: a ``pool_vms`` row (the pool
owns it), or the ``instance_id`` of one sandbox row (a sandbox owns it), or
nowhere (being deleted). ``take`` moves a ready VM from the first to the
second in one SQLite transaction, so a crash never leaves it in both and two
sandboxes never get the same VM. Rows are written before the VM is created
(state ``booting``), so a crash during a refill leaves a row recovery undoes, and
a VM being deleted keeps its row (``deleting``) until the cloud has deleted it.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field

from cloudadaptor.adaptor.store import SandboxStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pool_vms (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    vm_ips TEXT NOT NULL,
    user_data TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""
_COLUMNS = "name, state, instance_id, vm_ips, user_data, created_at"


class PoolState(str, enum.Enum):
    BOOTING = "booting"  # recorded, VM being created or booting: not claimable
    READY = "ready"  # its claim step answered over mTLS: claimable
    DELETING = "deleting"  # being deleted (retried until the cloud agrees): never claimable again


@dataclass(frozen=True)
class PoolVm:
    name: str  # VM name, TLS server name of its claim step, value of TAG_POOL
    state: PoolState
    instance_id: str = ""
    vm_ips: tuple[str, ...] = ()
    user_data: str = field(default="", repr=False)  # holds the VM's TLS key
    created_at: float = 0.0


class PoolStore:
    """Rows of ``pool_vms``; shares ``store``'s connection (and its 0600 file)."""

    def __init__(self, store: SandboxStore) -> None:
        self._db = store.connection
        self._db.execute(_SCHEMA)

    def add(self, name: str, user_data: str) -> PoolVm:
        """Record a VM about to be created (``booting``)."""
        vm = PoolVm(name, PoolState.BOOTING, user_data=user_data, created_at=time.time())
        self._db.execute(f"INSERT INTO pool_vms ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                         (vm.name, vm.state.value, "", "[]", user_data, vm.created_at))
        return vm

    def set_instance(self, name: str, instance_id: str, ips: tuple[str, ...]) -> None:
        self._db.execute("UPDATE pool_vms SET instance_id = ?, vm_ips = ? WHERE name = ?",
                         (instance_id, json.dumps(list(ips)), name))

    def mark_ready(self, name: str) -> None:
        self._db.execute("UPDATE pool_vms SET state = ? WHERE name = ?", (PoolState.READY.value, name))

    def mark_deleting(self, name: str) -> bool:
        """Make the VM unclaimable before deleting it; False when its row is gone (claimed or deleted)."""
        return self._db.execute("UPDATE pool_vms SET state = ? WHERE name = ?",
                                (PoolState.DELETING.value, name)).rowcount == 1

    def remove(self, name: str) -> bool:
        return self._db.execute("DELETE FROM pool_vms WHERE name = ?", (name,)).rowcount == 1

    def all(self) -> list[PoolVm]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM pool_vms ORDER BY created_at, name")
        return [_from_row(row) for row in rows.fetchall()]

    def get(self, name: str) -> PoolVm | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM pool_vms WHERE name = ?", (name,)).fetchone()
        return _from_row(row) if row else None

    def take(self, sandbox_id: str, not_before: float) -> PoolVm | None:
        """Hand the oldest ready VM created after ``not_before`` to ``sandbox_id``, atomically:
        its pool row is deleted and the sandbox row gets its instance id and IPs in one
        transaction. None when no such VM is ready (or the sandbox row is gone)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM pool_vms WHERE state = ? AND instance_id != '' AND created_at >= ? "
                "ORDER BY created_at, name LIMIT 1", (PoolState.READY.value, not_before)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                return None
            vm = _from_row(row)
            moved = db.execute("UPDATE sandboxes SET instance_id = ?, vm_ips = ?, updated_at = ? WHERE id = ?",
                               (vm.instance_id, json.dumps(list(vm.vm_ips)), time.time(), sandbox_id)).rowcount
            if moved != 1:
                db.execute("ROLLBACK")
                return None
            db.execute("DELETE FROM pool_vms WHERE name = ?", (vm.name,))
            db.execute("COMMIT")
            return vm
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _from_row(row: tuple[object, ...]) -> PoolVm:
    name, state, instance_id, ips, user_data, created_at = row
    return PoolVm(str(name), PoolState(state), str(instance_id), tuple(json.loads(str(ips))), str(user_data),
                  float(created_at))  # type: ignore[arg-type]
