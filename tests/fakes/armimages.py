"""The fake ARM endpoint, extended with what an image build does (``ImageFakeArm``).

An extension of ``armserver.FakeArm`` / ``armstate.ArmState`` kept in its own
module (the base fake belongs to the Azure provider's tests):

- VM actions ``POST .../virtualMachines/<vm>/deallocate`` (a long-running
  operation: 202 with ``Azure-AsyncOperation`` and ``Location``) and
  ``POST .../generalize`` (200; ARM refuses it for a VM that is not
  deallocated);
- managed images from a VM (``PUT .../images/<name>`` with
  ``sourceVirtualMachine``): refused unless the VM exists and is
  generalized; the image gets the VM's OS disk as its source;
- marketplace image references (``publisher``/``offer``/``sku``/``version``)
  for the images registered with ``add_marketplace_image``.

Faults work as in the base (``fail_next("POST", "deallocate")``,
``fail_next("PUT", "images", lro=True)``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fakes.armserver import FakeArm
from fakes.armstate import ArmError, ArmState, Json, Path, Reply, parse_path

RHEL9 = ("RedHat", "RHEL", "9-lvm-gen2")


@dataclass
class ImageArmState(ArmState):
    """``ArmState`` plus VM power state / generalization, VM actions and images from VMs."""

    marketplace: set[tuple[str, str, str]] = field(default_factory=set)  # (publisher, offer, sku), lower case
    power: dict[str, str] = field(default_factory=dict)  # VM key -> "running" | "deallocated"
    generalized: set[str] = field(default_factory=set)  # VM keys

    def _handle(self, method: str, raw_path: str, body: Any) -> Reply:
        path = parse_path(raw_path)
        if method == "POST" and path is not None and len(path.types) == 2 and path.types[0].lower() == "virtualmachines":
            fault = self._take_fault(method, path.kind)
            if fault is not None and not fault.lro:
                return fault.status, {}, {"error": {"code": fault.code, "message": fault.message}}
            return self._vm_action(path, fault)
        return super()._handle(method, raw_path, body)

    def _vm_action(self, path: Path, fault: Any) -> Reply:
        vm_key = path.key.rsplit("/", 1)[0]
        vm = self.resources.get(vm_key)
        if vm is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{vm_key}' was not found.")
        if path.kind == "deallocate":
            def finish() -> None:
                self.power[vm_key] = "deallocated"

            _, headers = self._operation("deallocate", finish, fault if fault is not None and fault.lro else None)
            base = headers["Azure-AsyncOperation"].replace("/operations/", "/operationResults/")
            return 202, {**headers, "Location": base}, None
        if path.kind == "generalize":
            if self.power.get(vm_key) != "deallocated":
                raise ArmError(409, "OperationNotAllowed",
                               "Operation 'generalize' is not allowed since the VM is not deallocated.")
            self.generalized.add(vm_key)
            return 200, {}, None
        raise ArmError(400, "InvalidResourceType", f"action {path.kind} is not supported by the fake ARM endpoint")

    def _put_virtualmachines(self, path: Path, vm: Json, existing: Json | None) -> None:
        super()._put_virtualmachines(path, vm, existing)
        self.power[path.key] = "running"
        self.generalized.discard(path.key)

    def _check_image(self, ref: Json) -> None:
        market = tuple(str(ref.get(k, "")).lower() for k in ("publisher", "offer", "sku"))
        if all(market):
            if market not in self.marketplace:
                raise ArmError(404, "PlatformImageNotFound",
                               f"The platform image '{':'.join(market)}:{ref.get('version')}' is not available.")
            return
        super()._check_image(ref)

    def _put_images(self, path: Path, image: Json, existing: Json | None) -> None:
        self._check_location(image)
        props = image["properties"]
        source = (props.get("sourceVirtualMachine") or {}).get("id", "")
        vm = self.resources.get(source.lower())
        if vm is None:
            raise ArmError(400, "InvalidParameter", f"sourceVirtualMachine {source or '(none)'} was not found.")
        if source.lower() not in self.generalized:
            raise ArmError(409, "OperationNotAllowed",
                           f"The source VM {source} must be generalized (and deallocated) to create an image.")
        os_disk = (vm["properties"].get("storageProfile") or {}).get("osDisk") or {}
        props["storageProfile"] = {"osDisk": {
            "osType": "Linux", "osState": "Generalized",
            "managedDisk": {"id": (os_disk.get("managedDisk") or {}).get("id", "")},
        }}
        props.setdefault("hyperVGeneration", "V1")


class ImageFakeArm(FakeArm):
    """``FakeArm`` whose cloud is an ``ImageArmState`` (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = ImageArmState(subscription_id=self.state.subscription_id, location=self.state.location)

    def add_marketplace_image(self, publisher: str, offer: str, sku: str) -> None:
        with self.state.lock:
            self.state.marketplace.add((publisher.lower(), offer.lower(), sku.lower()))

    def power_state(self, vm_id: str) -> str | None:
        with self.state.lock:
            return self.state.power.get(vm_id.lower())
