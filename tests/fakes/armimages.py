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
  for the images registered with ``add_marketplace_image``;
- Azure Compute Gallery resources (PUT/GET/DELETE with the long-running
  operation headers of the base): ``galleries/<g>``, image definitions
  ``galleries/<g>/images/<d>`` (a ``ConfidentialVmSupported`` feature demands
  Hyper-V V2, as ARM does) and image versions ``.../versions/<v>`` (Major.Minor.Patch;
  ``storageProfile.source.id`` must be a managed image whose OS state matches
  the definition's). The parent must exist (404 otherwise).

Faults work as in the base (``fail_next("POST", "deallocate")``,
``fail_next("PUT", "images", lro=True)``...).
"""

from __future__ import annotations

import re
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

    def _put_galleries(self, path: Path, gallery: Json, existing: Json | None) -> None:
        self._check_location(gallery)

    def _put_versions(self, path: Path, version: Json, existing: Json | None) -> None:
        self._check_location(version)
        if not re.fullmatch(r"\d+\.\d+\.\d+", path.names[-1]):
            raise ArmError(400, "InvalidParameter", f"The gallery image version name {path.names[-1]} is not "
                                                    "Major.Minor.Patch.")
        definition = self.resources[path.parent_key or ""]["properties"]
        source = ((version["properties"].get("storageProfile") or {}).get("source") or {}).get("id", "")
        image = self.resources.get(source.lower())
        if image is None or "/images/" not in source.lower() or "/galleries/" in source.lower():
            raise ArmError(400, "InvalidParameter", f"storageProfile.source.id {source or '(none)'} is not a managed image.")
        image_state = ((image["properties"].get("storageProfile") or {}).get("osDisk") or {}).get("osState")
        if image_state != definition.get("osState"):
            raise ArmError(400, "InvalidParameter", f"The source image is {image_state}, the image definition expects "
                                                    f"{definition.get('osState')}.")
        version["properties"]["storageProfile"]["osDiskImage"] = {"hostCaching": "ReadWrite", "source": {"id": source}}

    def _put_images(self, path: Path, image: Json, existing: Json | None) -> None:
        if path.types[0].lower() == "galleries":
            return self._put_gallery_image(image)
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


    def _put_gallery_image(self, definition: Json) -> None:
        self._check_location(definition)
        props = definition["properties"]
        features = {f.get("name", "").lower(): f.get("value", "").lower() for f in props.get("features") or []}
        if features.get("securitytype", "").startswith("confidentialvm") and props.get("hyperVGeneration") != "V2":
            raise ArmError(400, "InvalidParameter", "SecurityType ConfidentialVmSupported requires HyperVGeneration V2.")
        for key in ("osType", "osState", "identifier"):
            if not props.get(key):
                raise ArmError(400, "InvalidParameter", f"Required parameter '{key}' is missing (null).")


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
