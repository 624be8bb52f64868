"""SandboxStore: every sandbox and VM this node owns, persisted in SQLite.

The store is the daemon's memory across restarts: a restarted daemon reads it
to re-serve running sandboxes and to finish (or undo) work a crash interrupted.
Writes are small and synchronous; SQLite commits each one before returning, so
a row written is a row a restarted daemon will see.

The journal is a write-ahead log with ``synchronous=NORMAL``: a commit reaches
the log (the kernel's page cache) without an fsync, which SQLite leaves to the
checkpoints. A crash or kill of the daemon loses nothing; a power cut or kernel
crash may lose the last commits (never the database's consistency). Such a
node restarts with none of its pods running, and what the lost rows held is
found again by tag (the recovery's orphan sweep). An fsync per write blocked
the event loop for every one of a pod's eight or so changes (issue 16).

Schema changes are additive: a column added later is added to an existing
database on open (``_MIGRATIONS``), with a default that means "not set", so a
database written by an older daemon keeps working.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cloudadaptor.podconfig import PodNetworkConfig
from cloudadaptor.wire import MAX_VNI


class SandboxState(str, enum.Enum):
    CREATED = "created"  # CreateVM done: record, TLS material, user data
    STARTING = "starting"  # StartVM in progress: a VM may exist (found by tag)
    RUNNING = "running"  # VM up, agent proxy serving
    STOPPING = "stopping"  # StopVM in progress: the VM may still exist
    FAILED = "failed"  # StartVM failed and the VM was deleted; StopVM removes it


@dataclass
class Sandbox:
    id: str
    pod_name: str
    pod_namespace: str
    netns_path: str
    vm_name: str
    agent_socket: str
    annotations: dict[str, str] = field(default_factory=dict)
    # Holds the VM's TLS key: never logged (repr=False), DB file is 0600.
    user_data: str = field(default="", repr=False)
    state: SandboxState = SandboxState.CREATED
    instance_id: str = ""
    vm_ips: tuple[str, ...] = ()
    error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    # The pod's VXLAN network id, unique among the rows (0: none, e.g. a row
    # from before tunnels), and the pod network the VM was given (apf.json).
    vni: int = 0
    pod_network: PodNetworkConfig | None = None
    # The VM's server certificate (``certrenewal``): when it was issued and expires (epoch seconds; 0: not
    # read yet, taken from the user data), the key id of the CA that signed it, and "unsupported" when the
    # VM's image cannot renew (tried once, left alone).
    cert_issued_at: float = 0.0
    cert_not_after: float = 0.0
    cert_ca: str = ""
    cert_renewal: str = ""


_COLUMNS = [f.name for f in dataclasses.fields(Sandbox)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    pod_name TEXT NOT NULL,
    pod_namespace TEXT NOT NULL,
    netns_path TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    agent_socket TEXT NOT NULL,
    annotations TEXT NOT NULL,
    user_data TEXT NOT NULL,
    state TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    vm_ips TEXT NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""
# Columns added after the first schema: name -> definition (with the default
# existing rows get). Appended in order; never removed or renamed.
_MIGRATIONS = {
    "vni": "INTEGER NOT NULL DEFAULT 0",
    "pod_network": "TEXT NOT NULL DEFAULT ''",
    "cert_issued_at": "REAL NOT NULL DEFAULT 0",
    "cert_not_after": "REAL NOT NULL DEFAULT 0",
    "cert_ca": "TEXT NOT NULL DEFAULT ''",
    "cert_renewal": "TEXT NOT NULL DEFAULT ''",
}
_VNI_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_vni ON sandboxes (vni) WHERE vni > 0"
# Facts about this node that outlive restarts (e.g. the cluster id of a node without Kubernetes).
_FACTS = "CREATE TABLE IF NOT EXISTS facts (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


class VniExhausted(Exception):
    """Every VNI from the configured minimum up to 16777215 is in use."""


class VniInUse(Exception):
    """A row was added with a VNI another row holds."""


class SandboxStore:
    """Persistent map of sandbox id → ``Sandbox``. Not shared between processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600: the user data column holds per-VM TLS keys.
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        self._db.execute(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns an older database lacks; existing rows get their defaults."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(sandboxes)")}
        for column, definition in _MIGRATIONS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE sandboxes ADD COLUMN {column} {definition}")
        self._db.execute(_VNI_INDEX)
        self._db.execute(_FACTS)

    def fact(self, name: str) -> str | None:
        """A recorded fact (``record_fact``), or None."""
        row = self._db.execute("SELECT value FROM facts WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    def record_fact(self, name: str, value: str) -> None:
        """Record (or replace) a fact; committed before this returns."""
        self._db.execute("INSERT OR REPLACE INTO facts (name, value) VALUES (?, ?)", (name, value))

    def close(self) -> None:
        self._db.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The database, for tables kept next to the sandboxes (``poolstore``): one file, one transaction."""
        return self._db

    def add(self, sandbox: Sandbox) -> tuple[Sandbox, bool]:
        """Insert unless the id exists; returns (stored sandbox, inserted?).

        Raises ``VniInUse`` when another row holds ``sandbox.vni``.
        """
        now = time.time()
        sandbox.created_at = sandbox.updated_at = now
        try:
            self._db.execute(
                f"INSERT INTO sandboxes ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
                _to_row(sandbox),
            )
        except sqlite3.IntegrityError:
            existing = self.get(sandbox.id)
            if existing is None:
                raise VniInUse(f"VNI {sandbox.vni} is held by another sandbox") from None
            return existing, False
        return sandbox, True

    def get(self, sandbox_id: str) -> Sandbox | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sandboxes WHERE id = ?", (sandbox_id,)
        ).fetchone()
        return _from_row(row) if row else None

    def update(self, sandbox_id: str, **changes: Any) -> Sandbox:
        """Set the given fields; the sandbox as stored now. Raises KeyError for an unknown id."""
        self.change(sandbox_id, **changes)
        sandbox = self.get(sandbox_id)
        assert sandbox is not None
        return sandbox

    def change(self, sandbox_id: str, **changes: Any) -> None:
        """``update`` without reading the row back (most callers do not need it: a StartVM
        and StopVM change a row four times). Raises KeyError for an unknown id."""
        unknown = set(changes) - set(_COLUMNS) | ({"id", "created_at"} & set(changes))
        if unknown:
            raise ValueError(f"cannot update sandbox fields {sorted(unknown)}")
        changes["updated_at"] = time.time()
        encoded = {k: _encode(k, v) for k, v in changes.items()}
        cursor = self._db.execute(
            f"UPDATE sandboxes SET {', '.join(f'{k} = ?' for k in encoded)} WHERE id = ?",
            (*encoded.values(), sandbox_id),
        )
        if cursor.rowcount != 1:
            raise KeyError(sandbox_id)

    def next_free_vni(self, minimum: int) -> int:
        """The lowest VNI ``>= minimum`` no row holds. Every row is a live sandbox
        (StopVM removes the row only after its tunnel is gone), so the VNI is free
        on this node; a restarted daemon sees the same rows. The unique index
        refuses a duplicate should two writers race. Raises ``VniExhausted``."""
        candidate = minimum
        rows = self._db.execute("SELECT vni FROM sandboxes WHERE vni >= ? ORDER BY vni", (minimum,))
        for (used,) in rows:
            if used > candidate:
                break
            candidate = used + 1
        if candidate > MAX_VNI:
            raise VniExhausted(f"no free VXLAN network id between {minimum} and {MAX_VNI}")
        return candidate

    def remove(self, sandbox_id: str) -> bool:
        return self._db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,)).rowcount == 1

    def all(self) -> list[Sandbox]:
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sandboxes ORDER BY created_at")
        return [_from_row(row) for row in rows]

    def pod_of(self, sandbox_id: str) -> tuple[str, str, str] | None:
        """(pod namespace, pod name, instance id) of a sandbox, None for an unknown id: three columns,
        no decoding (every hypervisor call logs them)."""
        row = self._db.execute("SELECT pod_namespace, pod_name, instance_id FROM sandboxes WHERE id = ?",
                               (sandbox_id,)).fetchone()
        return (str(row[0]), str(row[1]), str(row[2])) if row else None

    def holding_vms(self) -> set[str]:
        """Ids of the rows that hold (or may hold) a VM: starting, running, or with an instance id.
        One query of the ids, not ``all()``: asked by every StartVM."""
        rows = self._db.execute("SELECT id FROM sandboxes WHERE state IN (?, ?) OR instance_id != ''",
                                (SandboxState.STARTING.value, SandboxState.RUNNING.value))
        return {row[0] for row in rows}

    def find_pod(self, pod_namespace: str, pod_name: str) -> Iterator[Sandbox]:
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sandboxes WHERE pod_namespace = ? AND pod_name = ? "
            "ORDER BY created_at DESC",
            (pod_namespace, pod_name),
        )
        return (_from_row(row) for row in rows.fetchall())


def _encode(column: str, value: Any) -> Any:
    if column == "annotations":
        return json.dumps(dict(value), sort_keys=True)
    if column == "vm_ips":
        return json.dumps(list(value))
    if column == "state":
        return SandboxState(value).value
    if column == "pod_network":
        return "" if value is None else json.dumps(value.to_dict(), sort_keys=True)
    return value


def _to_row(sandbox: Sandbox) -> tuple[Any, ...]:
    return tuple(_encode(name, getattr(sandbox, name)) for name in _COLUMNS)


def _from_row(row: tuple[Any, ...]) -> Sandbox:
    values = dict(zip(_COLUMNS, row))
    values["annotations"] = json.loads(values["annotations"])
    values["vm_ips"] = tuple(json.loads(values["vm_ips"]))
    values["state"] = SandboxState(values["state"])
    network = values["pod_network"]
    values["pod_network"] = PodNetworkConfig.from_dict(json.loads(network)) if network else None
    return Sandbox(**values)
