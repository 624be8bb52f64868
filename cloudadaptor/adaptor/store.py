"""SandboxStore: every sandbox and VM this node owns, persisted in SQLite.

The store is the daemon's memory across restarts: a restarted daemon reads it
to re-serve running sandboxes and to finish (or undo) work a crash interrupted.
Writes are small and synchronous; SQLite commits each one before returning, so
a row written is a row a restarted daemon will see.
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
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, sandbox: Sandbox) -> tuple[Sandbox, bool]:
        """Insert unless the id exists; returns (stored sandbox, inserted?)."""
        now = time.time()
        sandbox.created_at = sandbox.updated_at = now
        cursor = self._db.execute(
            f"INSERT OR IGNORE INTO sandboxes ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
            _to_row(sandbox),
        )
        if cursor.rowcount == 1:
            return sandbox, True
        existing = self.get(sandbox.id)
        assert existing is not None
        return existing, False

    def get(self, sandbox_id: str) -> Sandbox | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM sandboxes WHERE id = ?", (sandbox_id,)
        ).fetchone()
        return _from_row(row) if row else None

    def update(self, sandbox_id: str, **changes: Any) -> Sandbox:
        """Set the given fields; raises KeyError for an unknown id."""
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
        sandbox = self.get(sandbox_id)
        assert sandbox is not None
        return sandbox

    def remove(self, sandbox_id: str) -> bool:
        return self._db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,)).rowcount == 1

    def all(self) -> list[Sandbox]:
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sandboxes ORDER BY created_at")
        return [_from_row(row) for row in rows]

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
    return value


def _to_row(sandbox: Sandbox) -> tuple[Any, ...]:
    return tuple(_encode(name, getattr(sandbox, name)) for name in _COLUMNS)


def _from_row(row: tuple[Any, ...]) -> Sandbox:
    values = dict(zip(_COLUMNS, row))
    values["annotations"] = json.loads(values["annotations"])
    values["vm_ips"] = tuple(json.loads(values["vm_ips"]))
    values["state"] = SandboxState(values["state"])
    return Sandbox(**values)
