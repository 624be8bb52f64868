"""Local provider: real pod VMs without a cloud (docs/ARCHITECTURE.md, Local provider).

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
- its init (``cloudadaptor.providers.local_vm``, forked from the provider's
  fork server ``cloudadaptor.providers.local_forkserver``), PID 1 of its own PID
  namespace, which boots the real podvm components. VMs are not children of
  the adaptor and keep running when it exits, as cloud VMs would.

Addresses are allocated lowest-free from the instance files, so they persist
across restarts; allocation is serialized across processes with a lock file.
All network configuration goes through pyroute2 (blocking; run in a worker
thread). Everything this module creates is named after the instance id, so a
delete finds it even when ``instance.json`` is lost.

With ``LOCAL_VM=qemu`` a pod VM is instead a QEMU VM booting the image of
``image build local`` (``qemu``: overlay, tap ``lc-<12 hex>`` on the bridge,
QMP, KVM probe); it takes its user data from the cloud's IMDSv2 endpoint
(``cloudadaptor.providers.local_metadata``) rather than from a file, and has
no netns on the worker. ``instance.json`` records which kind a VM is.

The package: ``config`` (the keys), ``machine`` (bridge, netns, veth, init
process), ``qemu`` (QEMU VMs and the metadata service's start), ``provider``
(``LocalProvider``: records and the protocol).
"""

from cloudadaptor.providers.local.config import DEFAULT_BRIDGE, DEFAULT_CIDR, LocalConfig
from cloudadaptor.providers.local.machine import ID_PREFIX, host_veth_name, netns_name
from cloudadaptor.providers.local.provider import ID_PATTERN, LocalProvider

__all__ = ["DEFAULT_BRIDGE", "DEFAULT_CIDR", "ID_PATTERN", "ID_PREFIX", "LocalConfig", "LocalProvider",
           "host_veth_name", "netns_name"]
