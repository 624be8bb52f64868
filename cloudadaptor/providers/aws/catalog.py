"""Facts about AMIs and instance types, read from EC2 (blocking calls).

``TypeCatalog`` feeds ``providers.selection`` (vCPUs, MiB, GPUs) and says
which types support AMD SEV-SNP; ``ImageInfo`` gives the AMI's root device
and size (ROOT_VOLUME_SIZE is never below it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from botocore.exceptions import ClientError

from cloudadaptor.providers.aws.client import error_code
from cloudadaptor.providers.selection import InstanceTypeInfo

SEV_SNP_FEATURE = "amd-sev-snp"
SEV_SNP_BOOT_MODES = ("uefi", "uefi-preferred")
IMAGE_NOT_FOUND_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable", "InvalidAMIID.Malformed"})


@dataclass(frozen=True)
class ImageInfo:
    id: str
    name: str
    state: str
    root_device: str | None
    root_size_gib: int  # 0 when the AMI does not say
    boot_mode: str | None


@dataclass(frozen=True)
class TypeCatalog:
    types: Mapping[str, InstanceTypeInfo] = field(default_factory=dict)
    sev_snp: frozenset[str] = frozenset()

    def merged(self, other: TypeCatalog) -> TypeCatalog:
        return TypeCatalog({**self.types, **other.types}, self.sev_snp | other.sev_snp)


def image_info(image: Mapping[str, Any]) -> ImageInfo:
    """``ImageInfo`` from one DescribeImages entry."""
    root = image.get("RootDeviceName")
    size = 0
    for mapping in image.get("BlockDeviceMappings", []):
        ebs = mapping.get("Ebs")
        if ebs and (mapping.get("DeviceName") == root or not size):
            size = int(ebs.get("VolumeSize") or 0)
            if mapping.get("DeviceName") == root:
                break
    return ImageInfo(
        id=image["ImageId"],
        name=image.get("Name", ""),
        state=image.get("State", ""),
        root_device=root,
        root_size_gib=size,
        boot_mode=image.get("BootMode"),
    )


def describe_image(ec2: Any, image_id: str) -> ImageInfo | None:
    """The AMI, or None when EC2 does not know it in this region."""
    try:
        images = ec2.describe_images(ImageIds=[image_id]).get("Images", [])
    except ClientError as exc:
        if error_code(exc) in IMAGE_NOT_FOUND_CODES:
            return None
        raise
    return image_info(images[0]) if images else None


def _type_info(entry: Mapping[str, Any]) -> tuple[InstanceTypeInfo, bool]:
    gpus = sum(int(g.get("Count", 0)) for g in entry.get("GpuInfo", {}).get("Gpus", []))
    info = InstanceTypeInfo(
        name=entry["InstanceType"],
        vcpus=int(entry.get("VCpuInfo", {}).get("DefaultVCpus", 0)),
        memory_mib=int(entry.get("MemoryInfo", {}).get("SizeInMiB", 0)),
        gpus=gpus,
    )
    features = entry.get("ProcessorInfo", {}).get("SupportedFeatures", [])
    return info, SEV_SNP_FEATURE in features


def _describe_some(ec2: Any, names: list[str]) -> TypeCatalog:
    types: dict[str, InstanceTypeInfo] = {}
    snp: set[str] = set()
    for page in ec2.get_paginator("describe_instance_types").paginate(InstanceTypes=names):
        for entry in page.get("InstanceTypes", []):
            info, supports = _type_info(entry)
            types[info.name] = info
            if supports:
                snp.add(info.name)
    return TypeCatalog(types, frozenset(snp))


def describe_types(ec2: Any, names: Iterable[str]) -> tuple[TypeCatalog, list[str]]:
    """(catalog of the known ``names``, the names EC2 does not know)."""
    wanted = sorted(set(names))
    if not wanted:
        return TypeCatalog(), []
    try:
        catalog = _describe_some(ec2, wanted)
    except ClientError as exc:
        if error_code(exc) not in ("InvalidInstanceType", "InvalidParameterValue"):
            raise
        catalog = TypeCatalog()
        for name in wanted:  # one at a time, to name every unknown one
            try:
                catalog = catalog.merged(_describe_some(ec2, [name]))
            except ClientError as inner:
                if error_code(inner) not in ("InvalidInstanceType", "InvalidParameterValue"):
                    raise
    return catalog, [name for name in wanted if name not in catalog.types]
