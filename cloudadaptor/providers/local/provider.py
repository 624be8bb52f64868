"""``LocalProvider``: the ``Provider`` protocol on the local cloud (see the package
docstring). Records: one ``instance.json`` per VM, the address allocation and
the client-token adoption; the plumbing is in ``machine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Mapping

from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import linuxns
from cloudadaptor.providers import local_vm
from cloudadaptor.providers.base import ConsoleUnavailable, Instance, InstanceSpec, ProviderBase, ProviderError
from cloudadaptor.providers.local import machine, qemu
from cloudadaptor.providers.local_forkserver import ForkServer
from cloudadaptor.providers.local.config import LocalConfig

ID_PATTERN = machine.ID_PATTERN
INSTANCE_FILE = "instance.json"
LOCK_FILE = ".lock"
MACHINE_THREADS = 64  # concurrent creates/deletes; a thread only exists while used


@dataclass
class _Record:
    """What ``instance.json`` holds."""

    id: str
    name: str
    ip: str
    client_token: str
    tags: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    state: str = "creating"  # creating | running
    vm: str = "namespace"  # namespace | qemu (LOCAL_VM when it was created)

    def instance(self) -> Instance:
        return Instance(self.id, self.name, (self.ip,), dict(self.tags))


class LocalProvider(ProviderBase):
    """The ``local`` provider; see the package docstring.

    Holds no state beyond its config: everything is in the cloud directory,
    so several providers (or processes) can share one cloud.
    """

    name = "local"
    config_type: ClassVar[type[LocalConfig]] = LocalConfig

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        # Creates and deletes mostly wait for processes (a VM's launcher, its stop): with the
        # default executor's few threads, 30 pods started at once would queue in waves.
        self._machines = ThreadPoolExecutor(max_workers=MACHINE_THREADS, thread_name_prefix="local-vm")
        # Namespace VMs are forks of one pre-imported interpreter, not one new interpreter each (issue 16).
        self._forks = ForkServer(machine.vm_environment())
        self._bridge_ready = False  # ensure_bridge ran (per create it was a third of wire's requests)

    # ---------------------------------------------------------------- protocol

    async def verify(self) -> list[str]:
        """Create (or adopt) the bridge and the cloud directory; one line per problem."""
        return await asyncio.to_thread(self._verify)

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create a VM and start its boot; returns once it has its address (blocks ~0.2 s).

        A repeated ``client_token`` returns the instance made for it (even while
        that first create is still wiring and launching it). On failure
        everything created so far is removed before ``ProviderError`` is raised.
        """
        return await asyncio.get_running_loop().run_in_executor(self._machines, self._create, spec)

    async def delete_instance(self, instance_id: str) -> None:
        """Stop the VM (namespace: SIGTERM, SIGKILL after 5 s; QEMU: QMP quit, SIGKILL after
        5 s), then delete its veth or tap, netns and directory (with the QEMU overlay). Idempotent; an unknown id is success; safe to run concurrently."""
        await asyncio.get_running_loop().run_in_executor(self._machines, self._delete, instance_id)

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        """Instances whose tags include every one of ``tags`` (any state)."""
        return await asyncio.to_thread(self._list, dict(tags))

    async def describe_instance(self, instance_id: str) -> Instance | None:
        """The instance's record (any state); None when there is none."""
        if not ID_PATTERN.fullmatch(instance_id):
            return None
        record = await asyncio.to_thread(self._read, instance_id)
        return record.instance() if record is not None else None

    async def close(self) -> None:
        """Stop the fork server (started by the first namespace VM); VMs keep running."""
        await asyncio.to_thread(self._forks.close)

    async def console_output(self, instance_id: str) -> str:
        """The VM's ``console.log`` (its init's and components' output)."""
        path = self._dir(instance_id) / local_vm.CONSOLE_LOG
        try:
            return await asyncio.to_thread(path.read_text, errors="replace")
        except FileNotFoundError:
            raise ConsoleUnavailable(f"no console log for local VM {instance_id} (unknown or deleted VM)") from None
        except OSError as exc:
            raise ConsoleUnavailable(f"console log {path} unreadable: {exc}") from None

    def network_hint(self) -> str:
        """An address inside the VM network (no I/O): the worker's VXLAN address
        is the source of its route there, the gateway on the cloud bridge."""
        return str(self.config.cidr.network_address + 2)

    # ------------------------------------------------------------------- cloud

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.config.cloud_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.config.cloud_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _verify(self) -> list[str]:
        problems = []
        try:
            self.config.cloud_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.config.cloud_dir, prefix=".verify-"):
                pass
        except OSError as exc:
            problems.append(f"LOCAL_CLOUD_DIR {self.config.cloud_dir} is not writable: {exc}")
            return problems
        try:
            with self._locked():
                machine.ensure_bridge(self.config)
                self._bridge_ready = True
        except (OSError, NetlinkError, ProviderError) as exc:
            problems.append(f"cannot create or adopt the bridge {self.config.bridge}: {exc}")
        netns_dir = os.path.dirname(linuxns.netns_path("x"))
        try:
            os.makedirs(netns_dir, exist_ok=True)
            if not os.access(netns_dir, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:
            problems.append(f"{netns_dir} is not usable, VM network namespaces cannot be made there: {exc}")
        if self.config.vm == "qemu":
            try:
                qemu.binary(qemu.QEMU)
                qemu.binary(qemu.QEMU_IMG)
                qemu.accelerator(self.config, qemu.image_for(self.config))
            except ProviderError as exc:
                problems.append(f"LOCAL_VM=qemu: {exc}")
        else:
            try:  # now, so the first pod does not wait for its imports
                self._forks.start()
            except OSError as exc:
                problems.append(f"cannot start the local VM fork server: {exc}")
        return problems

    # ---------------------------------------------------------------- records

    def _dir(self, instance_id: str) -> Path:
        return self.config.cloud_dir / instance_id

    def _records(self) -> list[_Record]:
        records = []
        if not self.config.cloud_dir.is_dir():
            return records
        for entry in sorted(self.config.cloud_dir.iterdir()):
            if ID_PATTERN.fullmatch(entry.name):
                record = self._read(entry.name)
                if record is not None:
                    records.append(record)
        return records

    def _read(self, instance_id: str) -> _Record | None:
        try:
            data = json.loads((self._dir(instance_id) / INSTANCE_FILE).read_text())
            return _Record(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _write(self, record: _Record) -> None:
        path = self._dir(record.id) / INSTANCE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record.__dict__, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def _list(self, tags: dict[str, str]) -> list[Instance]:
        return [
            r.instance() for r in self._records()
            if all(r.tags.get(k) == v for k, v in tags.items())
        ]

    def _allocate_ip(self, records: list[_Record]) -> str:
        used = {r.ip for r in records}
        for host in self.config.cidr.hosts():
            if host != self.config.gateway and str(host) not in used:
                return str(host)
        raise ProviderError(f"no free address left in the local cloud {self.config.cidr}")

    # ----------------------------------------------------------------- create

    def _create(self, spec: InstanceSpec) -> Instance:
        try:
            record, new = self._reserve(spec)
        except (OSError, NetlinkError) as exc:
            raise ProviderError(f"local cloud {self.config.bridge} ({self.config.cloud_dir}) unusable: {exc}") from exc
        if not new:
            return record.instance()  # made earlier for this client token
        try:
            if record.vm == "namespace":
                machine.wire(self.config, record.id, record.ip)
            user_data = self._dir(record.id) / local_vm.USER_DATA_SUBPATH
            user_data.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(user_data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(spec.user_data)
            record.pid = self._launch(record)
            record.state = "running"
            self._write(record)
        except Exception as exc:
            cleanup = self._teardown(record.id)
            detail = f" (cleanup also failed: {'; '.join(cleanup)})" if cleanup else ""
            if isinstance(exc, ProviderError):
                raise ProviderError(f"{exc}{detail}") from exc
            raise ProviderError(f"creating local VM {record.id} failed: {exc}{detail}") from exc
        return record.instance()

    def _reserve(self, spec: InstanceSpec) -> tuple[_Record, bool]:
        """(the record already made for ``spec.client_token``, False), or (a new
        one holding the lowest free address, written before the lock is released, True)."""
        with self._locked():
            # Once per daemon for namespace VMs: wire() re-makes a bridge that vanished since.
            if not self._bridge_ready or self.config.vm == "qemu":
                machine.ensure_bridge(self.config)
                self._bridge_ready = True
            records = self._records()
            for record in records:
                if spec.client_token and record.client_token == spec.client_token:
                    return record, False
            record = _Record(
                id=machine.ID_PREFIX + secrets.token_hex(6),
                name=spec.name,
                ip=self._allocate_ip(records),
                client_token=spec.client_token,
                tags=dict(spec.tags),
                vm=self.config.vm,
            )
            (self._dir(record.id) / local_vm.RUN_SUBDIR).mkdir(parents=True)
            self._write(record)
            if record.vm == "qemu":
                try:
                    qemu.ensure_metadata(self.config)  # after the record: its idle exit sees this instance
                except ProviderError:
                    shutil.rmtree(self._dir(record.id), ignore_errors=True)  # nothing was started for it
                    raise
            return record, True

    def _launch(self, record: _Record) -> int:
        """Start the VM (its init, or QEMU); its PID (a seam: tests make it fail)."""
        if record.vm == "qemu":
            return qemu.launch(self.config, record.id, self._dir(record.id), record.ip,
                               machine.host_veth_name(record.id))
        return machine.launch(self.config, record.id, self._dir(record.id), self._forks)

    # ----------------------------------------------------------------- delete

    def _delete(self, instance_id: str) -> None:
        if not ID_PATTERN.fullmatch(instance_id):
            return  # not a local instance id: nothing of that name can exist
        problems = self._teardown(instance_id)
        if problems:
            raise ProviderError(f"deleting local VM {instance_id} failed: {'; '.join(problems)}")

    def _teardown(self, instance_id: str) -> list[str]:
        """Remove every part of the instance that exists; the problems met (empty when done)."""
        problems: list[str] = []
        directory = self._dir(instance_id)
        try:
            machine.stop_vm(instance_id, directory)
            qemu.stop(instance_id, directory, machine.console_tail(directory, 8))
        except ProviderError as exc:
            return [str(exc)]  # keep the rest: a running VM still uses its netns and dir
        problems += machine.unwire(instance_id)
        trash = self.config.cloud_dir / f".deleted-{instance_id}-{secrets.token_hex(4)}"
        try:
            os.rename(directory, trash)  # frees the address at once
        except FileNotFoundError:
            return problems
        except OSError as exc:
            problems.append(f"cannot remove {directory}: {exc}")
            return problems
        shutil.rmtree(trash, ignore_errors=True)
        return problems
