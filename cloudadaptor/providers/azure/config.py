"""Azure keys (docs/ARCHITECTURE.md, Configuration) parsed into a frozen ``AzureConfig``; no SDK import here.

Operators set the keys they already use with the Go adaptor: the cm
(``AZURE_INSTANCE_SIZE``, ``AZURE_INSTANCE_SIZES``, ``AZURE_SUBNET_ID``,
``AZURE_NSG_ID``, ``AZURE_IMAGE_ID``, ``SSH_USERNAME``, ``ENABLE_SECURE_BOOT``)
and the secret (``AZURE_CLIENT_ID``, ``AZURE_CLIENT_SECRET``,
``AZURE_TENANT_ID``, ``AZURE_SUBSCRIPTION_ID``, ``AZURE_REGION``,
``AZURE_RESOURCE_GROUP``), plus ``SSH_PUB_KEY_PATH`` and
``AZURE_RESOURCE_MANAGER_ENDPOINT``. Resource ids are checked for shape here;
whether they exist is checked at start (``checks``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from cloudadaptor.config import Problem, Settings, parse_abs_path, parse_bool, parse_csv
from cloudadaptor.providers.config import ProviderConfig, option
from cloudadaptor.wire import VXLAN_PORT

PUBLIC_ARM_ENDPOINT = "https://management.azure.com"
DEFAULT_SSH_USERNAME = "peerpod"
DEFAULT_SSH_PUB_KEY_PATH = Path("/root/.ssh/id_rsa.pub")
# Default size when neither AZURE_INSTANCE_SIZE nor PODVM_INSTANCE_TYPE is set:
# a confidential-VM size, or the doc example when DISABLECVM=true.
DEFAULT_CVM_SIZE = "Standard_DC2as_v5"
DEFAULT_SIZE = "Standard_B2als_v2"

_SEG = r"([^/]+)"
_RG = r"/subscriptions/" + _SEG + r"/resourceGroups/" + _SEG
SUBNET_ID = re.compile(_RG + r"/providers/Microsoft\.Network/virtualNetworks/" + _SEG + r"/subnets/" + _SEG, re.I)
NSG_ID = re.compile(_RG + r"/providers/Microsoft\.Network/networkSecurityGroups/" + _SEG, re.I)
VM_ID = re.compile(_RG + r"/providers/Microsoft\.Compute/virtualMachines/" + _SEG, re.I)
_IMAGE_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("managed", re.compile(_RG + r"/providers/Microsoft\.Compute/images/" + _SEG, re.I)),
    ("gallery", re.compile(_RG + r"/providers/Microsoft\.Compute/galleries/" + _SEG + "/images/" + _SEG
                           + "/versions/" + _SEG, re.I)),
    ("shared", re.compile(r"/SharedGalleries/" + _SEG + "/Images/" + _SEG + "/Versions/" + _SEG, re.I)),
    ("community", re.compile(r"/CommunityGalleries/" + _SEG + "/Images/" + _SEG + "/Versions/" + _SEG, re.I)),
)
IMAGE_EXPECTED = (
    "expected a managed image id (/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/images/<name>), "
    "a gallery image version id (.../Microsoft.Compute/galleries/<g>/images/<i>/versions/<v>), "
    "a shared gallery id (/SharedGalleries/<g>/Images/<i>/Versions/<v>) "
    "or a community gallery id (/CommunityGalleries/<g>/Images/<i>/Versions/<v>)"
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_USERNAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# Names Azure refuses as adminUsername (Linux), lower-cased.
_RESERVED_USERS = frozenset({
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root",
    "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
})


@dataclass(frozen=True)
class ResourceId:
    """A parsed ARM resource id: subscription, resource group and the name parts after the provider."""

    text: str
    subscription: str
    resource_group: str
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[-1]


@dataclass(frozen=True)
class ImageRef:
    """An image id and what kind it is: ``managed``, ``gallery``, ``shared`` or ``community``.

    ``parts`` are the id's variable segments in order (for ``managed``:
    subscription, resource group, image name).
    """

    text: str
    kind: str
    parts: tuple[str, ...]

    def reference(self) -> dict[str, str]:
        """The ARM ``imageReference`` object for this image."""
        if self.kind == "shared":
            return {"sharedGalleryImageId": self.text}
        if self.kind == "community":
            return {"communityGalleryImageId": self.text}
        return {"id": self.text}


def _resource_id(pattern: re.Pattern[str], text: str, expected: str) -> ResourceId:
    match = pattern.fullmatch(text.strip())
    if match is None:
        raise ValueError(expected)
    sub, rg, *names = match.groups()
    return ResourceId(text.strip(), sub, rg, tuple(names))


def parse_subnet_id(text: str) -> ResourceId:
    return _resource_id(SUBNET_ID, text, "expected a subnet id: /subscriptions/<sub>/resourceGroups/<rg>/providers/"
                        "Microsoft.Network/virtualNetworks/<vnet>/subnets/<subnet>")


def parse_nsg_id(text: str) -> ResourceId:
    return _resource_id(NSG_ID, text, "expected a network security group id: /subscriptions/<sub>/resourceGroups/<rg>/"
                        "providers/Microsoft.Network/networkSecurityGroups/<name>")


def parse_vm_id(text: str) -> ResourceId:
    return _resource_id(VM_ID, text, "expected a virtual machine id: /subscriptions/<sub>/resourceGroups/<rg>/"
                        "providers/Microsoft.Compute/virtualMachines/<name>")


def parse_image_id(text: str) -> ImageRef:
    """Classify an image id (see ``IMAGE_EXPECTED``); ValueError says what is accepted."""
    text = text.strip()
    for kind, pattern in _IMAGE_KINDS:
        match = pattern.fullmatch(text)
        if match is not None:
            return ImageRef(text, kind, tuple(match.groups()))
    raise ValueError(IMAGE_EXPECTED)


def parse_uuid(text: str) -> str:
    if not _UUID.fullmatch(text.strip()):
        raise ValueError("expected a GUID like 00000000-0000-0000-0000-000000000000")
    return text.strip().lower()


def parse_region(text: str) -> str:
    """"East US" or "eastus" -> "eastus"."""
    region = re.sub(r"\s+", "", text).lower()
    if not re.fullmatch(r"[a-z0-9]+", region):
        raise ValueError("expected an Azure region name like eastus or westeurope")
    return region


def parse_resource_group(text: str) -> str:
    name = text.strip()
    if not re.fullmatch(r"[-\w.()]{1,90}", name) or name.endswith("."):
        raise ValueError("expected a resource group name: 1-90 letters, digits, '-', '_', '.', '(' or ')'")
    return name


def parse_ssh_username(text: str) -> str:
    name = text.strip()
    if not _USERNAME.fullmatch(name) or name in _RESERVED_USERS:
        raise ValueError("expected a Linux user name (lower case, up to 32 characters) that Azure allows "
                         "(not root, admin, administrator, ...)")
    return name


def parse_https_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("expected an https:// URL such as https://management.azure.com "
                         "(Azure refuses bearer tokens over plain http)")
    return text.strip().rstrip("/")


@dataclass(frozen=True)
class AzureConfig(ProviderConfig):
    """Everything the Azure provider needs, parsed once.

    ``instance_size(s)`` are the keys as given; ``size`` and ``sizes`` are what
    the provider uses (``build`` falls back to PODVM_INSTANCE_TYPE(S) and the
    defaults). The tuning fields after ``extra_tags`` are not operator keys:
    they have production defaults and tests make them tiny.
    """

    subscription_id: str = option("AZURE_SUBSCRIPTION_ID", parse_uuid, required=True,
                                  help="subscription the pod VMs are created in")
    region: str = option("AZURE_REGION", parse_region, required=True, help="region of the pod VMs, e.g. eastus")
    resource_group: str = option("AZURE_RESOURCE_GROUP", parse_resource_group, required=True,
                                 help="resource group of the pod VMs")
    subnet: ResourceId = option("AZURE_SUBNET_ID", parse_subnet_id, required=True, help="subnet id of the pod VMs' NICs")
    nsg: ResourceId | None = option("AZURE_NSG_ID", parse_nsg_id, help="network security group id put on each pod VM NIC")
    image: ImageRef | None = option(
        "AZURE_IMAGE_ID", parse_image_id, help="pod VM image (managed, gallery, shared or community gallery id)")
    instance_size: str | None = option("AZURE_INSTANCE_SIZE", str, help="default VM size, e.g. Standard_B2als_v2")
    instance_sizes: tuple[str, ...] = option("AZURE_INSTANCE_SIZES", parse_csv, (), help="allowed VM sizes (comma list)")
    ssh_username: str = option("SSH_USERNAME", parse_ssh_username, DEFAULT_SSH_USERNAME, help="admin user of the pod VMs")
    ssh_pub_key_path: Path = option(
        "SSH_PUB_KEY_PATH", parse_abs_path, DEFAULT_SSH_PUB_KEY_PATH,
        help="SSH public key file (id_rsa.pub of ssh-key-secret); the only way in (no password)")
    secure_boot: bool = option("ENABLE_SECURE_BOOT", parse_bool, False, help="UEFI secure boot on pod VMs")
    arm_endpoint: str = option(
        "AZURE_RESOURCE_MANAGER_ENDPOINT", parse_https_url, PUBLIC_ARM_ENDPOINT,
        help="Azure Resource Manager endpoint (sovereign clouds, test endpoints)")
    client_id: str | None = option("AZURE_CLIENT_ID", str, help="service principal or workload identity client id")
    tenant_id: str | None = option("AZURE_TENANT_ID", str, help="Entra ID tenant")
    client_secret: str | None = option(
        "AZURE_CLIENT_SECRET", str, secret=True, help="service principal secret (unset: default credential chain)")
    # Derived from the keys above and the common settings (``build``).
    size: str = DEFAULT_CVM_SIZE
    sizes: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # PODVM_IMAGES: what the image annotation may pick
    disable_cvm: bool = False
    root_volume_gib: int = 0
    use_public_ip: bool = False
    vxlan_port: int = VXLAN_PORT
    extra_tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    polling_interval: float = 5.0  # seconds between LRO polls when ARM sends no Retry-After
    retry_total: int = 8  # HTTP retries (429/5xx/connection), honouring Retry-After
    retry_backoff_factor: float = 0.8
    retry_backoff_max: float = 60.0
    in_use_timeout: float = 240.0  # how long a NIC/disk delete retries "still in use"
    in_use_backoff: float = 2.0

    @property
    def credential_scope(self) -> str:
        """The token scope of this ARM endpoint (sovereign clouds have their own)."""
        return self.arm_endpoint + "/.default"

    @classmethod
    def build(cls, settings: Settings, **options: Any) -> AzureConfig:
        """The options plus the common settings. The size is AZURE_INSTANCE_SIZE, else
        PODVM_INSTANCE_TYPE, else the first allowed size, else a default (a
        confidential size unless DISABLECVM=true)."""
        sizes = tuple(options["instance_sizes"] or ()) or tuple(settings.podvm_instance_types)
        disable_cvm = bool(settings.disable_cvm)
        explicit = options["instance_size"] or settings.podvm_instance_type
        size = explicit or (sizes[0] if sizes else (DEFAULT_SIZE if disable_cvm else DEFAULT_CVM_SIZE))
        return cls(
            **options, size=size, sizes=sizes, images=tuple(settings.podvm_images), disable_cvm=disable_cvm,
            root_volume_gib=settings.root_volume_size,
            use_public_ip=settings.use_public_ip, vxlan_port=settings.vxlan_port, extra_tags=dict(settings.tags),
        )

    def problems(self) -> list[Problem]:
        """A client secret without client and tenant id, a size outside the
        allow-list, a subnet in another subscription."""
        problems: list[Problem] = []
        if self.client_secret:
            for name, value in (("AZURE_CLIENT_ID", self.client_id), ("AZURE_TENANT_ID", self.tenant_id)):
                if not value:
                    problems.append(Problem(name, None, "required when AZURE_CLIENT_SECRET is set"))
        if self.sizes and self.size not in self.sizes:
            problems.append(Problem("AZURE_INSTANCE_SIZE", self.size,
                                    "expected one of AZURE_INSTANCE_SIZES: " + ", ".join(self.sizes)))
        subnet = self.subnet
        if subnet is not None and self.subscription_id and subnet.subscription.lower() != self.subscription_id:
            problems.append(Problem("AZURE_SUBNET_ID", subnet.text,
                                    "expected a subnet in AZURE_SUBSCRIPTION_ID (NICs and subnets share a subscription)"))
        return problems


def read_ssh_public_key(path: Path) -> str:
    """The public key in ``path`` (first line); ValueError saying what is wrong."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = text.splitlines()[0].strip() if text else ""
    if not key.startswith(("ssh-", "ecdsa-")) or len(key.split()) < 2:
        raise ValueError(f"{path} does not hold an SSH public key (expected e.g. 'ssh-rsa AAAA... comment')")
    return key
