"""Instance type choice shared by every cloud provider.

1. The pod's ``machine_type`` annotation wins.
2. Else, when the pod asks for vCPUs/memory/GPUs and an allow-list
   (``PODVM_INSTANCE_TYPES``) exists, the smallest allowed type that fits:
   least memory first, then fewest vCPUs, then fewest GPUs.
3. Else the default (``PODVM_INSTANCE_TYPE``).
The result must be in the allow-list when one is set.

The image annotation is checked against its own allow-list (``PODVM_IMAGES``)
by ``check_image``; the configured default image is the operator's choice and
always allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class InstanceTypeInfo:
    name: str
    vcpus: int
    memory_mib: int
    gpus: int = 0


class SelectionError(ValueError):
    """No instance type can be chosen; the message says why and what is allowed."""


def select_instance_type(
    *,
    requested: str | None,
    vcpus: int | None,
    memory_mib: int | None,
    gpus: int = 0,
    default: str | None,
    allowed: Sequence[str],
    catalog: Mapping[str, InstanceTypeInfo],
    default_key: str = "PODVM_INSTANCE_TYPE",
    allowed_key: str = "PODVM_INSTANCE_TYPES",
) -> str:
    """Pick the instance type for one pod. Pure: ``catalog`` holds the specs of
    the allowed types (the provider looks them up once at start). Messages name
    ``default_key`` and ``allowed_key``, the keys the provider reads them from."""
    allowed_text = ", ".join(allowed)
    if requested:
        if allowed and requested not in allowed:
            raise SelectionError(f"instance type {requested!r} (machine_type annotation) is not in {allowed_key} ({allowed_text})")
        return requested
    wants_fit = bool(vcpus or memory_mib or gpus)
    if wants_fit and allowed:
        fitting = [
            catalog[name]
            for name in allowed
            if name in catalog
            and catalog[name].vcpus >= (vcpus or 0)
            and catalog[name].memory_mib >= (memory_mib or 0)
            and catalog[name].gpus >= gpus
        ]
        if not fitting:
            raise SelectionError(
                f"no allowed instance type fits {vcpus or 0} vCPU, {memory_mib or 0} MiB, {gpus} GPU "
                f"({allowed_key}: {allowed_text})"
            )
        return min(fitting, key=lambda t: (t.memory_mib, t.vcpus, t.gpus, t.name)).name
    if default:
        if allowed and default not in allowed:
            raise SelectionError(f"{default_key} {default!r} is not in {allowed_key} ({allowed_text})")
        return default
    if allowed:
        return allowed[0]
    raise SelectionError(f"no instance type: set {default_key} (or the provider's default) or {allowed_key}")


def check_image(requested: str | None, allowed: Sequence[str], *, allowed_key: str = "PODVM_IMAGES") -> None:
    """Refuse an image annotation that is not in ``allowed`` (compared without
    case: Azure ids are case-insensitive, AMI ids lower-case). No list, no limit."""
    if requested and allowed and requested.strip().lower() not in {a.lower() for a in allowed}:
        raise SelectionError(f"image {requested!r} (image annotation) is not in {allowed_key} ({', '.join(allowed)})")
