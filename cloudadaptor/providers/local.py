"""Local provider: real pod VMs without a cloud (DESIGN §5).

A "cloud" is a Linux bridge (``LOCAL_CLOUD_BRIDGE``, holding the gateway
address: the first host of ``LOCAL_CLOUD_CIDR``) in the worker's network
namespace plus a directory (``LOCAL_CLOUD_DIR``). A pod VM is:

- a network namespace ``/run/netns/<instance id>`` with ``eth0`` (a veth
  whose host end ``lc-<12 hex>`` is on the bridge) holding the VM's address,
  ``lo`` up and a default route via the gateway;
- ``<cloud dir>/<instance id>/``: ``instance.json`` (id, name, ip, tags,
  client_token, pid, state), ``console.log`` (the VM's serial console),
  ``run/`` (the VM's own ``/run``; the user data is ``run/cloud-data/user-data``,
  read in the VM as ``/run/cloud-data/user-data``) and ``init.pid``;
- its init (``cloudadaptor.providers.local_vm``), PID 1 of its own PID
  namespace, which boots the real podvm components. VMs are not children of
  the adaptor and keep running when it exits, as cloud VMs would.

Addresses are allocated lowest-free from the instance files, so they persist
across restarts; allocation is serialized across processes with a lock file.
All network configuration goes through pyroute2 (blocking; run in a worker
thread). Everything this module creates is named after the instance id, so a
delete finds it even when ``instance.json`` is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import linuxns
from cloudadaptor.config import Key, Settings, parse_abs_path, parse_duration
from cloudadaptor.providers import local_vm
from cloudadaptor.providers.base import Instance, InstanceSpec, ProviderError

DEFAULT_CIDR = ipaddress.IPv4Network("192.0.2.0/24")
DEFAULT_BRIDGE = "ppcloud0"
CLOUD_SUBDIR = "local-cloud"
ID_PREFIX = "i-local-"
ID_PATTERN = re.compile(r"i-local-[0-9a-f]{12}")
INSTANCE_FILE = "instance.json"
LOCK_FILE = ".lock"
VM_IFNAME = "eth0"
LAUNCH_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL
KILL_TIMEOUT = 5.0


# ------------------------------------------------------------------ config keys


def parse_cloud_cidr(text: str) -> ipaddress.IPv4Network:
    expected = "expected an IPv4 network like 192.0.2.0/24 with room for the gateway and VMs (/30 or larger)"
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        raise ValueError(expected) from None
    if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
        raise ValueError(expected)
    return network


def parse_ifname(text: str) -> str:
    name = text.strip()
    if not 1 <= len(name) <= 15 or name in (".", "..") or re.search(r"[\s/:]", name):
        raise ValueError("expected an interface name of 1 to 15 characters without '/', ':' or spaces")
    return name


def parse_agent_command(text: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"expected a shell-style command line ({exc})") from None
    if not words or not any("{socket}" in word for word in words):
        raise ValueError("expected a command line containing {socket} (the agent's unix socket path)")
    return text.strip()


@dataclass(frozen=True)
class LocalConfig:
    cloud_dir: Path
    cidr: ipaddress.IPv4Network = DEFAULT_CIDR
    bridge: str = DEFAULT_BRIDGE
    boot_delay: float = 0.0
    agent_command: str | None = None  # None: the development agent

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.cidr.network_address + 1


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

    def instance(self) -> Instance:
        return Instance(self.id, self.name, (self.ip,), dict(self.tags))


def host_veth_name(instance_id: str) -> str:
    """The bridge-side veth of an instance: ``lc-<12 hex>`` (15 chars)."""
    return "lc-" + instance_id[len(ID_PREFIX):]


def netns_name(instance_id: str) -> str:
    return instance_id


class LocalProvider:
    """The ``local`` provider; see the module docstring.

    Holds no state beyond its config: everything is in the cloud directory,
    so several providers (or processes) can share one cloud.
    """

    name = "local"
    KEYS: ClassVar[tuple[Key, ...]] = (
        Key("LOCAL_CLOUD_CIDR", parse_cloud_cidr, DEFAULT_CIDR,
            help="the local cloud's IPv4 network; the first host is the worker's gateway address"),
        Key("LOCAL_CLOUD_BRIDGE", parse_ifname, DEFAULT_BRIDGE, help="bridge the pod VMs are attached to"),
        Key("LOCAL_BOOT_DELAY", parse_duration, 0.0, help="imitated cloud boot time, e.g. 2s"),
        Key("LOCAL_AGENT_COMMAND", parse_agent_command, None,
            help="agent a VM runs; {socket} becomes its socket path (default: the development agent)"),
        Key("LOCAL_CLOUD_DIR", parse_abs_path, None, help="instance directories (default: <STATE_DIR>/local-cloud)"),
    )

    def __init__(self, config: LocalConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, values: Mapping[str, Any], settings: Settings) -> LocalProvider:
        cloud_dir = values.get("LOCAL_CLOUD_DIR") or Path(settings.state_dir) / CLOUD_SUBDIR
        return cls(LocalConfig(
            cloud_dir=Path(cloud_dir),
            cidr=values.get("LOCAL_CLOUD_CIDR") or DEFAULT_CIDR,
            bridge=values.get("LOCAL_CLOUD_BRIDGE") or DEFAULT_BRIDGE,
            boot_delay=values.get("LOCAL_BOOT_DELAY") or 0.0,
            agent_command=values.get("LOCAL_AGENT_COMMAND"),
        ))

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
        return await asyncio.to_thread(self._create, spec)

    async def delete_instance(self, instance_id: str) -> None:
        """Stop the VM (SIGTERM, SIGKILL after 5 s), then delete its veth, netns and
        directory. Idempotent; an unknown id is success; safe to run concurrently."""
        await asyncio.to_thread(self._delete, instance_id)

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        """Instances whose tags include every one of ``tags`` (any state)."""
        return await asyncio.to_thread(self._list, dict(tags))

    async def close(self) -> None:
        """Nothing to release; VMs keep running."""

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
                self._ensure_bridge()
        except (OSError, NetlinkError, ProviderError) as exc:
            problems.append(f"cannot create or adopt the bridge {self.config.bridge}: {exc}")
        netns_dir = os.path.dirname(linuxns.netns_path("x"))
        try:
            os.makedirs(netns_dir, exist_ok=True)
            if not os.access(netns_dir, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:
            problems.append(f"{netns_dir} is not usable, VM network namespaces cannot be made there: {exc}")
        return problems

    def _ensure_bridge(self) -> int:
        """The bridge's index; created with the gateway address and up if missing."""
        cfg = self.config
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=cfg.bridge)
            if not found:
                _tolerate(errno.EEXIST, ipr.link, "add", ifname=cfg.bridge, kind="bridge")
                found = ipr.link_lookup(ifname=cfg.bridge)
            index = found[0]
            linkinfo = ipr.get_links(index)[0].get("IFLA_LINKINFO")
            kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo is not None else None
            if kind != "bridge":
                raise ProviderError(f"{cfg.bridge} exists and is not a bridge (kind {kind!r})")
            have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
            if (str(cfg.gateway), cfg.cidr.prefixlen) not in have:
                _tolerate(errno.EEXIST, ipr.addr, "add", index=index, address=str(cfg.gateway),
                          prefixlen=cfg.cidr.prefixlen)
            ipr.link("set", index=index, state="up")
            return index

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
            self._wire(record)
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
            self._ensure_bridge()
            records = self._records()
            for record in records:
                if spec.client_token and record.client_token == spec.client_token:
                    return record, False
            record = _Record(
                id=ID_PREFIX + secrets.token_hex(6),
                name=spec.name,
                ip=self._allocate_ip(records),
                client_token=spec.client_token,
                tags=dict(spec.tags),
            )
            (self._dir(record.id) / local_vm.RUN_SUBDIR).mkdir(parents=True)
            self._write(record)
            return record, True

    def _wire(self, record: _Record) -> None:
        """The VM's netns, veth to the bridge, address and default route."""
        cfg = self.config
        name = netns_name(record.id)
        host = host_veth_name(record.id)
        netns.create(name)
        with IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname=cfg.bridge)[0]
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": VM_IFNAME, "net_ns_fd": name})
            index = ipr.link_lookup(ifname=host)[0]
            ipr.link("set", index=index, master=bridge, state="up")
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname=VM_IFNAME)[0]
            ipr.addr("add", index=index, address=record.ip, prefixlen=cfg.cidr.prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(cfg.gateway))

    def _launch(self, record: _Record) -> int:
        """Start the VM's init; returns its PID once it runs in its own namespaces."""
        directory = self._dir(record.id)
        argv = [
            sys.executable, "-m", local_vm.MODULE,
            "--instance-dir", str(directory),
            "--netns", linuxns.netns_path(netns_name(record.id)),
            "--boot-delay", repr(self.config.boot_delay),
        ]
        if self.config.agent_command:
            argv += ["--agent-command", self.config.agent_command]
        with open(directory / local_vm.CONSOLE_LOG, "ab") as console:
            launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd="/", env=_vm_environment())
        try:
            code = launcher.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            raise ProviderError(f"local VM {record.id} did not start within {LAUNCH_TIMEOUT:g}s") from None
        if code != 0:
            raise ProviderError(f"local VM {record.id} failed to start (exit {code}): {self._console_tail(record.id)}")
        return int((directory / local_vm.PID_FILE).read_text())

    def _console_tail(self, instance_id: str, lines: int = 5) -> str:
        try:
            text = (self._dir(instance_id) / local_vm.CONSOLE_LOG).read_text(errors="replace")
        except OSError:
            return "<no console log>"
        return " | ".join(text.strip().splitlines()[-lines:]) or "<empty console log>"

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
            self._stop_vm(instance_id)
        except ProviderError as exc:
            return [str(exc)]  # keep the rest: a running VM still uses its netns and dir
        try:
            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=host_veth_name(instance_id)):
                    _tolerate(errno.ENODEV, ipr.link, "del", index=index)
        except (OSError, NetlinkError) as exc:
            problems.append(f"cannot delete veth {host_veth_name(instance_id)}: {exc}")
        try:
            netns.remove(linuxns.netns_path(netns_name(instance_id)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot delete netns {netns_name(instance_id)}: {exc}")
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

    def _stop_vm(self, instance_id: str) -> None:
        directory = self._dir(instance_id)
        try:
            pid = int((directory / local_vm.PID_FILE).read_text())
        except (OSError, ValueError):
            return  # never launched (or already deleted)
        if not _is_vm_init(pid, directory):
            return
        for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, KILL_TIMEOUT)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not _alive(pid):
                return  # init gone: the kernel has ended its PID namespace
        raise ProviderError(f"local VM {instance_id} (pid {pid}) survived SIGKILL")


# ----------------------------------------------------------------------- helpers


def _tolerate(code: int, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call a pyroute2 method, ignoring the netlink error ``code`` (EEXIST, ENODEV...)."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != code:
            raise


def _vm_environment() -> dict[str, str]:
    """What a VM inherits from the worker: enough to run Python, none of the
    adaptor's configuration or credentials (a cloud VM sees none of them)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYTHON")}


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is dead: its PID namespace is already gone)."""
    return _proc_state(pid) not in (None, "Z", "X")


def _is_vm_init(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is the running init of the VM in ``directory`` (not a reused PID)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return local_vm.MODULE.encode() in args and str(directory).encode() in args
