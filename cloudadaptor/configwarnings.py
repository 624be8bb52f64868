"""What ``config check`` warns about without refusing: settings that work but deserve a look.

- **Permissive annotations.** With neither an instance-type allow-list
  (``PODVM_INSTANCE_TYPES``, or ``AZURE_INSTANCE_SIZES``) nor an image
  allow-list (``PODVM_IMAGES``), a pod's annotations may pick any instance
  type and any image the cloud account can use. That default is kept (it is
  what operators expect), so it is a warning, not a problem.
- **Keys of the Go cloud-api-adaptor** (its ``peer-pods-cm``) that this
  implementation does not read: set, they would be ignored without a word.
  ``GO_KEYS`` is the table (facts from the Go project's chart values and
  flag registrations; docs/MIGRATION.md has the key-by-key table). A key
  this implementation later declares stops being reported by itself.

Warnings never change ``config check``'s exit code.
"""

from __future__ import annotations

from typing import Collection, Mapping

INSTANCE_TYPE_ALLOW_LISTS = ("PODVM_INSTANCE_TYPES", "AZURE_INSTANCE_SIZES")
IMAGE_ALLOW_LIST = "PODVM_IMAGES"

# Go peer-pods-cm key -> what to do here instead.
GO_KEYS: Mapping[str, str] = {
    "CLOUD_CONFIG_VERIFY": "always on here: serve checks credentials and resources at start (config check shows the keys)",
    "ENABLE_SCRATCH_SPACE": "not supported: no encrypted scratch disk is attached to pod VMs",
    "EXTERNAL_NETWORK_VIA_PODVM": "not supported (experimental in Go): pod traffic leaves through the worker",
    "POD_SUBNET_CIDRS": "not supported (goes with EXTERNAL_NETWORK_VIA_PODVM)",
    "FORWARDER_PORT": "not configurable: the forwarder listens on 15150 (wire.AGENT_PORT)",
    "PAUSE_IMAGE": "not used: the pod VM image brings its own pause image",
    "REMOTE_HYPERVISOR_ENDPOINT": "renamed: use SOCKET",
    "TLS_CIPHER_SUITES": "not configurable: the TLS library's defaults for TLS_MIN_VERSION are used",
    "TUNNEL_TYPE": "only vxlan is supported (the default); remove the key",
    "ENABLE_CLOUD_PROVIDER_EXTERNAL_PLUGIN": "providers are Python entry points here (docs/PROVIDERS.md), no Go plugins",
    "CLOUD_PROVIDER_EXTERNAL_PLUGIN_PATH": "providers are Python entry points here (docs/PROVIDERS.md)",
    "CLOUD_PROVIDER_EXTERNAL_PLUGIN_HASH": "providers are Python entry points here (docs/PROVIDERS.md)",
    "CRI_RUNTIME_ENDPOINT": "not used: this adaptor does not talk to the CRI runtime",
    "SECURE_COMMS": "not supported: the agent channel is mutual TLS (CACERT_FILE/CERT_FILE/CERT_KEY or generated)",
    "SECURE_COMMS_KBS_ADDR": "not supported (goes with SECURE_COMMS)",
    "SECURE_COMMS_NO_TRUSTEE": "not supported (goes with SECURE_COMMS)",
    "SECURE_COMMS_INBOUNDS": "not supported (goes with SECURE_COMMS)",
    "SECURE_COMMS_OUTBOUNDS": "not supported (goes with SECURE_COMMS)",
    "SECURE_COMMS_PP_INBOUNDS": "not supported (goes with SECURE_COMMS)",
    "SECURE_COMMS_PP_OUTBOUNDS": "not supported (goes with SECURE_COMMS)",
}


def _set(env: Mapping[str, str], name: str) -> bool:
    return bool((env.get(name) or "").strip())


def config_warnings(env: Mapping[str, str], declared: Collection[str]) -> list[str]:
    """One line per warning for ``env``; ``declared`` are the keys this
    implementation reads (common and the chosen provider's)."""
    warnings = []
    if not any(_set(env, key) for key in (*INSTANCE_TYPE_ALLOW_LISTS, IMAGE_ALLOW_LIST)):
        warnings.append(
            f"no allow-list: pod annotations may choose any instance type and any image; set "
            f"PODVM_INSTANCE_TYPES (or AZURE_INSTANCE_SIZES) and {IMAGE_ALLOW_LIST} to limit them")
    for key, instead in GO_KEYS.items():
        if key not in declared and _set(env, key):
            warnings.append(f"{key} (a key of the Go cloud-api-adaptor) is ignored: {instead}")
    return warnings
