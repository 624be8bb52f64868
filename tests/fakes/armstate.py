"""The in-memory cloud behind the fake ARM endpoint (``armserver``), moto style.

Resources are JSON documents keyed by their lower-cased id (ARM ids are
case-insensitive). Writes and deletes are long-running operations that honour
ARM's protocol: ``201``/``200`` (PUT) or ``202`` (DELETE) with an
``Azure-AsyncOperation`` URL whose status is ``InProgress`` for
``lro_polls`` polls, then ``Succeeded`` (or ``Failed`` with an error), and
``provisioningState`` on the resource follows. Semantics modelled where a
provider can get them wrong: tag names without ``/`` (or the other reserved
characters), NICs get an address from their subnet, a VM
needs an existing NIC, image and a size offered in the region, SSH-only
Linux profile, user data at most 64 KiB; a VM's OS disk is created with it;
``deleteOption: Delete`` removes NIC and disk with the VM; a NIC attached to
a VM cannot be deleted; NSG rule priorities are unique per direction.

Faults (``Fault``) are consumed in order by the requests they match: a
synchronous error reply (e.g. 429 with ``Retry-After``) or, with
``lro=True``, a write accepted whose operation then fails.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

Json = dict[str, Any]
Reply = tuple[int, dict[str, str], Any]
USER_DATA_LIMIT = 65536


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def reply(self) -> Reply:
        return self.status, {}, {"error": {"code": self.code, "message": self.message}}


@dataclass
class Fault:
    """Matches requests by method and resource kind (last type segment, e.g.
    ``virtualMachines``); None matches any. Used ``times`` times."""

    method: str | None = None
    kind: str | None = None
    status: int = 500
    code: str = "InternalServerError"
    message: str = "injected fault"
    retry_after: str | None = None
    lro: bool = False
    times: int = 1

    def matches(self, method: str, kind: str | None) -> bool:
        return (self.method is None or self.method == method) and (
            self.kind is None or (kind is not None and self.kind.lower() == kind.lower()))


@dataclass
class Operation:
    id: str
    polls_left: int
    finish: Callable[[], None]
    error: tuple[str, str] | None = None  # (code, message): the operation fails
    fail: Callable[[], None] | None = None
    status: str = "InProgress"


@dataclass
class Path:
    """A parsed request path: ``/.../providers/<ns>/<type>/<name>/<type>[/<name>]``."""

    text: str
    key: str
    namespace: str
    types: list[str]
    names: list[str]
    resource_group: str | None

    @property
    def is_collection(self) -> bool:
        return len(self.types) > len(self.names)

    @property
    def kind(self) -> str:
        return self.types[-1].lower()

    @property
    def type(self) -> str:
        return "/".join([self.namespace, *self.types])

    @property
    def parent_key(self) -> str | None:
        """The key of the parent resource for a child (subnet → vnet), else None."""
        if len(self.names) < 2:
            return None
        return self.key.rsplit("/", 2)[0]


def parse_path(text: str) -> Path | None:
    parts = [p for p in text.split("?")[0].split("/") if p]
    lower = [p.lower() for p in parts]
    if "providers" not in lower:
        return None
    at = len(lower) - 1 - lower[::-1].index("providers")
    rest = parts[at + 2:]
    if at + 1 >= len(parts) or not rest:
        return None
    rg = parts[lower.index("resourcegroups") + 1] if "resourcegroups" in lower[:at] else None
    return Path("/" + "/".join(parts), "/" + "/".join(lower), parts[at + 1], rest[0::2], rest[1::2], rg)


@dataclass
class ArmState:
    """The fake cloud: resources, SKUs, operations and faults, under one lock."""

    subscription_id: str
    location: str
    base_url: str = ""
    lro_polls: int = 0  # polls an operation stays InProgress ...
    lro_polls_by_kind: dict[str, int] = field(default_factory=dict)  # ... or per kind, e.g. {"virtualmachines": 5}
    lro_retry_after: str | None = None
    page_size: int | None = None  # lists answer this many items a page, with a nextLink to the rest
    honour_delete_options: bool = True
    missing_delete_status: int = 204  # real ARM: 204; some paths answer 404
    resources: dict[str, Json] = field(default_factory=dict)
    deleted: list[Json] = field(default_factory=list)  # every resource deleted, in order
    skus: list[Json] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    consoles: dict[str, str] = field(default_factory=dict)  # VM name -> its boot diagnostics serial log
    operations: dict[str, Operation] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ---------------------------------------------------------------- dispatch

    def handle(self, method: str, raw_path: str, body: Any) -> Reply:
        with self.lock:
            try:
                return self._handle(method, raw_path, body)
            except ArmError as exc:
                return exc.reply()

    def _handle(self, method: str, raw_path: str, body: Any) -> Reply:
        bare = raw_path.split("?")[0]
        tail = bare.rstrip("/").rsplit("/", 2)
        if len(tail) == 3 and tail[1] in ("operations", "operationResults") and tail[2] in self.operations:
            return self._poll(self.operations[tail[2]], results=tail[1] == "operationResults")
        path = parse_path(raw_path)
        fault = self._take_fault(method, path.kind if path else None)
        if fault is not None and not fault.lro:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return fault.status, headers, {"error": {"code": fault.code, "message": fault.message}}
        if not bare.lower().startswith(f"/subscriptions/{self.subscription_id.lower()}"):
            sub = (bare.split("/") + ["", "", ""])[2]
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found.")
        if method == "POST" and bare.rstrip("/").endswith("/retrieveBootDiagnosticsData"):
            return self._boot_diagnostics(bare.rstrip("/").rsplit("/", 1)[0])
        if path is None:
            raise ArmError(400, "InvalidResourceType", f"no resource provider path in {bare}")
        if path.resource_group and f"/subscriptions/{self.subscription_id}/resourcegroups/{path.resource_group}".lower() \
                not in self.resources:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{path.resource_group}' could not be found.")
        if method == "GET":
            return self._list(path, raw_path) if path.is_collection else (200, {}, self._get(path.key))
        if method == "PUT" and not path.is_collection:
            return self._put(path, body if isinstance(body, dict) else {}, fault)
        if method == "DELETE" and not path.is_collection:
            return self._delete(path)
        raise ArmError(405, "MethodNotAllowed", f"{method} {bare} is not supported by the fake ARM endpoint")

    def _boot_diagnostics(self, vm_key: str) -> Reply:
        """VM retrieveBootDiagnosticsData: SAS URIs of the blobs (served by armserver under /fakeblobs/)."""
        vm = self._get(vm_key)
        profile = vm.get("properties", {}).get("diagnosticsProfile", {}).get("bootDiagnostics", {})
        if not profile.get("enabled"):
            raise ArmError(409, "OperationNotAllowed", "Boot diagnostics are not enabled for this virtual machine.")
        blobs = f"{self.base_url}/fakeblobs/{vm['name']}"
        return 200, {}, {"consoleScreenshotBlobUri": f"{blobs}/screenshot.bmp?sv=2024&sig=fake-sas-signature",
                         "serialConsoleLogBlobUri": f"{blobs}/serial.log?sv=2024&sig=fake-sas-signature"}

    def _take_fault(self, method: str, kind: str | None) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, kind):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _get(self, key: str) -> Json:
        resource = self.resources.get(key.lower())
        if resource is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{key}' was not found.")
        return resource

    def _list(self, path: Path, raw_path: str) -> Reply:
        if path.kind == "skus":
            query = raw_path.partition("?")[2].replace("%20", " ").replace("%27", "'").replace("+", " ").lower()
            wanted = query.split("location eq '")[1].split("'")[0] if "location eq '" in query else None
            skus = [s for s in self.skus if wanted is None or wanted in [loc.lower() for loc in s["locations"]]]
            return self._page(skus, raw_path)
        prefix = path.key + "/"
        items = [r for k, r in sorted(self.resources.items()) if k.startswith(prefix) and "/" not in k[len(prefix):]]
        return self._page(items, raw_path)

    def _page(self, items: list[Json], raw_path: str) -> Reply:
        """One page of ``items`` (all of them unless ``page_size``), from ``$skiptoken``, and ARM's ``nextLink``."""
        query = dict(urllib.parse.parse_qsl(raw_path.partition("?")[2]))
        start = int(query.get("$skiptoken", "0"))
        if self.page_size is None:
            return 200, {}, {"value": items}
        end = start + self.page_size
        reply: Json = {"value": items[start:end]}
        if end < len(items):
            reply["nextLink"] = (f"{self.base_url}{raw_path.partition('?')[0]}?"
                                 + urllib.parse.urlencode({**query, "$skiptoken": str(end)}))
        return 200, {}, reply

    # ---------------------------------------------------------------- operations

    def _operation(self, kind: str, finish: Callable[[], None], fault: Fault | None = None,
                   fail: Callable[[], None] | None = None) -> tuple[Operation, dict[str, str]]:
        polls = self.lro_polls_by_kind.get(kind, self.lro_polls)
        op = Operation(uuid.uuid4().hex, polls, finish, fail=fail)
        if fault is not None:
            op.error = (fault.code, fault.message)
        self.operations[op.id] = op
        base = f"{self.base_url}/subscriptions/{self.subscription_id}/providers/Fake.Arm/locations/{self.location}"
        headers = {"Azure-AsyncOperation": f"{base}/operations/{op.id}?api-version=fake"}
        if self.lro_retry_after is not None:
            headers["Retry-After"] = self.lro_retry_after
        return op, headers

    def _poll(self, op: Operation, results: bool) -> Reply:
        if op.status == "InProgress" and not results:
            if op.polls_left > 0:
                op.polls_left -= 1
            elif op.error is None:
                op.finish()
                op.status = "Succeeded"
            else:
                if op.fail is not None:
                    op.fail()
                op.status = "Failed"
        if results:
            return (202, {}, None) if op.status == "InProgress" else (204, {}, None)
        reply: Json = {"name": op.id, "status": op.status}
        if op.status == "Failed" and op.error is not None:
            reply["error"] = {"code": op.error[0], "message": op.error[1]}
        headers = {"Retry-After": self.lro_retry_after} if self.lro_retry_after and op.status == "InProgress" else {}
        return 200, headers, reply

    # ---------------------------------------------------------------- writes

    def _put(self, path: Path, body: Json, fault: Fault | None) -> Reply:
        parent = path.parent_key
        if parent is not None and parent not in self.resources:
            raise ArmError(404, "ParentResourceNotFound", f"parent resource of {path.text} not found")
        for name in (body.get("tags") or {}):
            if any(c in name for c in '<>%&\\?/') or len(name) > 512:
                raise ArmError(400, "InvalidTagNameCharacters",
                               f"The tag names '{name}' have reserved characters '<,>,%,&,\\,?,/' or control characters.")
        existing = self.resources.get(path.key)
        resource: Json = {**body, "id": existing["id"] if existing else path.text, "name": path.names[-1], "type": path.type}
        props = resource.setdefault("properties", {})
        hook = getattr(self, f"_put_{path.kind}", None)
        if hook is not None:
            hook(path, resource, existing)
        props["provisioningState"] = "Updating" if existing else "Creating"
        self.resources[path.key] = resource

        def finish() -> None:
            props["provisioningState"] = "Succeeded"

        def fail() -> None:
            props["provisioningState"] = "Failed"

        _, headers = self._operation(path.kind, finish, fault if fault is not None and fault.lro else None, fail)
        return (200 if existing else 201), headers, resource

    def _delete(self, path: Path) -> Reply:
        resource = self.resources.get(path.key)
        if resource is None:
            if self.missing_delete_status == 404:
                raise ArmError(404, "ResourceNotFound", f"The Resource '{path.text}' was not found.")
            return self.missing_delete_status, {}, None
        check = getattr(self, f"_delete_check_{path.kind}", None)
        if check is not None:
            check(resource)
        resource["properties"]["provisioningState"] = "Deleting"
        cascade = getattr(self, f"_delete_{path.kind}", None)

        def finish() -> None:
            self.deleted.append(resource)
            self.resources.pop(path.key, None)
            for key in [k for k in self.resources if k.startswith(path.key + "/")]:
                del self.resources[key]
            if cascade is not None:
                cascade(resource)

        op, headers = self._operation(path.kind, finish)
        base = headers["Azure-AsyncOperation"].replace("/operations/", "/operationResults/")
        return 202, {**headers, "Location": base}, None

    # ---------------------------------------------------------------- NICs

    def _ref(self, obj: Json | None, what: str, owner: str, status: int = 400) -> Json:
        ref_id = (obj or {}).get("id")
        if not ref_id or ref_id.lower() not in self.resources:
            raise ArmError(status, "InvalidResourceReference",
                           f"Resource {ref_id} referenced by resource {owner} was not found ({what}).")
        return self.resources[ref_id.lower()]

    def _put_networkinterfaces(self, path: Path, nic: Json, existing: Json | None) -> None:
        self._check_location(nic)
        props = nic["properties"]
        if props.get("networkSecurityGroup"):
            self._ref(props["networkSecurityGroup"], "network security group", path.text)
        old = existing["properties"] if existing else {}
        for index, config in enumerate(props.get("ipConfigurations") or []):
            cprops = config.setdefault("properties", {})
            subnet = self._ref(cprops.get("subnet"), "subnet", path.text)
            previous = (old.get("ipConfigurations") or [{}] * (index + 1))[index:index + 1]
            kept = previous[0].get("properties", {}).get("privateIPAddress") if previous else None
            cprops["privateIPAddress"] = kept or self._allocate(subnet)
            config.setdefault("id", f"{path.text}/ipConfigurations/{config.get('name', 'ipconfig1')}")
        if old.get("virtualMachine"):
            props["virtualMachine"] = old["virtualMachine"]

    def _allocate(self, subnet: Json) -> str:
        network = ipaddress.ip_network(subnet["properties"]["addressPrefix"])
        used = {c.get("properties", {}).get("privateIPAddress")
                for r in self.resources.values() if r.get("type", "").lower() == "microsoft.network/networkinterfaces"
                for c in r["properties"].get("ipConfigurations") or []}
        for host in list(network.hosts())[3:]:  # Azure reserves the first addresses
            if str(host) not in used:
                return str(host)
        raise ArmError(400, "SubnetIsFull", f"subnet {subnet['id']} has no free address")

    def _delete_check_networkinterfaces(self, nic: Json) -> None:
        vm = nic["properties"].get("virtualMachine")
        if vm and vm["id"].lower() in self.resources:
            raise ArmError(400, "NicInUse", f"Network Interface {nic['id']} is used by existing resource {vm['id']}.")

    # ---------------------------------------------------------------- VMs

    def _check_location(self, resource: Json) -> None:
        if str(resource.get("location", "")).lower() != self.location:
            raise ArmError(400, "LocationNotAvailableForResourceType",
                           f"location {resource.get('location')!r}; this fake cloud is {self.location!r}")

    def _put_virtualmachines(self, path: Path, vm: Json, existing: Json | None) -> None:
        self._check_location(vm)
        props = vm["properties"]
        size = (props.get("hardwareProfile") or {}).get("vmSize")
        if not any(s["name"] == size and self.location in s["locations"] and not s.get("restrictions") for s in self.skus):
            raise ArmError(409, "SkuNotAvailable", f"The requested VM size {size} is not available in {self.location}.")
        storage = props.get("storageProfile") or {}
        self._check_image(storage.get("imageReference") or {})
        self._check_os_profile(props.get("osProfile") or {})
        self._check_user_data(props.get("userData"))
        vm_id = vm["id"]
        for ref in (props.get("networkProfile") or {}).get("networkInterfaces") or []:
            nic = self._ref(ref, "network interface", vm_id)
            owner = nic["properties"].get("virtualMachine")
            if owner and owner["id"].lower() != vm_id.lower():
                raise ArmError(400, "NicInUse", f"NIC {nic['id']} is attached to {owner['id']}")
            nic["properties"]["virtualMachine"] = {"id": vm_id}
        os_disk = storage.setdefault("osDisk", {})
        disk_name = os_disk.get("name") or f"{path.names[-1]}_OsDisk_1_{uuid.uuid4().hex}"
        disk_id = f"/subscriptions/{self.subscription_id}/resourceGroups/{path.resource_group}" \
                  f"/providers/Microsoft.Compute/disks/{disk_name}"
        if disk_id.lower() not in self.resources:
            self.resources[disk_id.lower()] = {
                "id": disk_id, "name": disk_name, "type": "Microsoft.Compute/disks", "location": self.location,
                "managedBy": vm_id, "properties": {"diskState": "Attached", "provisioningState": "Succeeded"},
            }
        os_disk.setdefault("managedDisk", {})["id"] = disk_id
        props["vmId"] = (existing or {}).get("properties", {}).get("vmId") or str(uuid.uuid4())

    def _check_image(self, ref: Json) -> None:
        key = ref.get("id")
        for field_name, kind in (("sharedGalleryImageId", "sharedGalleries"), ("communityGalleryImageId", "communityGalleries")):
            if ref.get(field_name):
                parts = ref[field_name].strip("/").split("/")
                key = (f"/subscriptions/{self.subscription_id}/providers/Microsoft.Compute/locations/{self.location}/"
                       f"{kind}/{parts[1]}/images/{parts[3]}/versions/{parts[5]}") if len(parts) == 6 else ref[field_name]
        if not key or key.lower() not in self.resources:
            raise ArmError(400, "InvalidParameter", f"The image {key or ref} was not found (imageReference).")

    @staticmethod
    def _check_os_profile(profile: Json) -> None:
        linux = profile.get("linuxConfiguration") or {}
        keys = ((linux.get("ssh") or {}).get("publicKeys")) or []
        if not profile.get("adminUsername"):
            raise ArmError(400, "InvalidParameter", "osProfile.adminUsername is required")
        if linux.get("disablePasswordAuthentication") and not keys:
            raise ArmError(400, "InvalidParameter", "an SSH public key is required when password authentication is disabled")
        if not linux.get("disablePasswordAuthentication") and not profile.get("adminPassword"):
            raise ArmError(400, "InvalidParameter", "adminPassword is required when password authentication is enabled")

    @staticmethod
    def _check_user_data(text: str | None) -> None:
        if text is None:
            return
        try:
            size = len(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ArmError(400, "InvalidParameter", "userData must be base64 encoded") from None
        if size > USER_DATA_LIMIT:
            raise ArmError(400, "InvalidParameter", f"userData is {size} bytes; the limit is {USER_DATA_LIMIT}")

    def _delete_virtualmachines(self, vm: Json) -> None:
        """Dependents of a deleted VM: removed when their deleteOption is Delete, else detached."""
        props = vm["properties"]
        for ref in (props.get("networkProfile") or {}).get("networkInterfaces") or []:
            nic = self.resources.get(ref["id"].lower())
            if nic is None:
                continue
            if self.honour_delete_options and (ref.get("properties") or {}).get("deleteOption") == "Delete":
                self.deleted.append(self.resources.pop(ref["id"].lower()))
            else:
                nic["properties"].pop("virtualMachine", None)
        os_disk = (props.get("storageProfile") or {}).get("osDisk") or {}
        disk_id = (os_disk.get("managedDisk") or {}).get("id", "")
        disk = self.resources.get(disk_id.lower())
        if disk is not None:
            if self.honour_delete_options and os_disk.get("deleteOption") == "Delete":
                self.deleted.append(self.resources.pop(disk_id.lower()))
            else:
                disk.pop("managedBy", None)
                disk["properties"]["diskState"] = "Unattached"

    def _delete_check_disks(self, disk: Json) -> None:
        owner = disk.get("managedBy")
        if owner and owner.lower() in self.resources:
            raise ArmError(409, "OperationNotAllowed", f"Disk {disk['name']} is attached to VM {owner}.")

    # ---------------------------------------------------------------- NSG rules

    def _put_securityrules(self, path: Path, rule: Json, existing: Json | None) -> None:
        props = rule["properties"]
        priority, direction = props.get("priority"), str(props.get("direction", "")).lower()
        if not isinstance(priority, int) or not 100 <= priority <= 4096:
            raise ArmError(400, "SecurityRuleInvalidPriority", f"priority {priority!r} must be 100..4096")
        prefix = path.parent_key + "/securityrules/"
        for key, other in self.resources.items():
            if key.startswith(prefix) and key != path.key and other["properties"].get("priority") == priority \
                    and str(other["properties"].get("direction", "")).lower() == direction:
                raise ArmError(400, "SecurityRuleConflict",
                               f"rules {other['name']} and {path.names[-1]} have the same priority {priority}")
