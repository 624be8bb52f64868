"""Azure: publish a built managed image as an Azure Compute Gallery image version (``image build azure --gallery``).

A confidential VM cannot boot from a managed image, only from a gallery image
version whose image definition declares ``SecurityType=ConfidentialVmSupported``.
``publish`` makes, in ``AZURE_RESOURCE_GROUP`` and ``AZURE_REGION``:

- the gallery ``NAME`` (kept as it is when it exists);
- the image definition (named after the image, e.g. ``peer-pod-vmimage``):
  Linux, ``Generalized`` (the build generalizes the builder VM, so its image
  is generalized), Hyper-V ``V2`` (confidential VMs are generation 2 only),
  feature ``SecurityType=ConfidentialVmSupported`` — the same definition the
  Go project's ``az-copy-image`` creates. An existing definition that cannot
  back a confidential VM is an error, never silently changed (ARM refuses
  most changes to a definition);
- the image version ``podvm_version`` (Major.Minor.Patch from our version)
  from the managed image, replicated to the region.

Idempotent: a version that already exists from the same image is reused; one
made from another image is an error unless ``replace`` (``--replace``), which
deletes it first; a version that failed is deleted and made again. A version
whose creation fails is deleted before the error is raised. Blocking.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from azure.core.exceptions import AzureError

from cloudadaptor import __version__
from cloudadaptor.imagebuild.common import BuildError
from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure.config import AzureConfig
from cloudadaptor.providers.azure.tags import to_azure_tags

SECURITY_FEATURE = {"name": "SecurityType", "value": "ConfidentialVmSupported"}
OS_STATE = "Generalized"
HYPER_V_GENERATION = "V2"
# The definition's identifier: publisher/offer/sku must be unique in a gallery.
IDENTIFIER_PUBLISHER = "peerpods"
IDENTIFIER_OFFER = "podvm"


def podvm_version(version: str = __version__) -> str:
    """A gallery version (``Major.Minor.Patch``, integers) from our version: ``0.1.0.dev3`` → ``0.1.0``."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if match is None:
        raise BuildError(f"version {version!r} has no Major.Minor.Patch for a gallery image version")
    return ".".join(part or "0" for part in match.groups())


def definition_body(config: AzureConfig, name: str, tags: Mapping[str, str]) -> dict[str, Any]:
    return {
        "location": config.region,
        "tags": to_azure_tags(tags),
        "properties": {
            "osType": "Linux",
            "osState": OS_STATE,
            "hyperVGeneration": HYPER_V_GENERATION,
            "identifier": {"publisher": IDENTIFIER_PUBLISHER, "offer": IDENTIFIER_OFFER, "sku": name},
            "features": [dict(SECURITY_FEATURE)],
        },
    }


def definition_problem(definition: Any) -> str | None:
    """Why an existing image definition cannot back a confidential VM, or None."""
    features = {az.text(f.name).lower(): az.text(f.value).lower() for f in (definition.features or [])}
    if features.get("securitytype") not in ("confidentialvmsupported", "confidentialvm"):
        return "it does not declare SecurityType=ConfidentialVmSupported"
    if az.text(definition.os_state).lower() != OS_STATE.lower():
        return f"its OS state is {az.text(definition.os_state)}, the image is {OS_STATE}"
    if az.text(definition.hyper_v_generation).upper() != HYPER_V_GENERATION:
        return f"it is Hyper-V {az.text(definition.hyper_v_generation)}, confidential VMs need {HYPER_V_GENERATION}"
    return None


def _get(fn: Callable[[], Any]) -> Any | None:
    try:
        return fn()
    except AzureError as exc:
        if az.is_not_found(exc):
            return None
        raise


def publish(clients: az.AzureClients, config: AzureConfig, *, gallery: str, definition: str, image_id: str,
            tags: Mapping[str, str], version: str | None = None, replace: bool = False) -> str:
    """Publish ``image_id`` as ``gallery/definition/version``; the version's id (for ``AZURE_IMAGE_ID``)."""
    version = version or podvm_version()
    try:
        return _publish(clients, config, gallery, definition, image_id, tags, version, replace)
    except AzureError as exc:
        raise BuildError(f"publishing {gallery}/{definition}/{version}: {az.describe(exc)}") from None


def _publish(clients: az.AzureClients, config: AzureConfig, gallery: str, definition: str, image_id: str,
             tags: Mapping[str, str], version: str, replace: bool) -> str:
    rg, compute = config.resource_group, clients.compute
    if _get(lambda: compute.galleries.get(rg, gallery)) is None:
        compute.galleries.begin_create_or_update(
            rg, gallery, {"location": config.region, "tags": to_azure_tags(tags)}).result()
    existing_definition = _get(lambda: compute.gallery_images.get(rg, gallery, definition))
    if existing_definition is None:
        compute.gallery_images.begin_create_or_update(rg, gallery, definition,
                                                      definition_body(config, definition, tags)).result()
    else:
        problem = definition_problem(existing_definition)
        if problem:
            raise BuildError(f"gallery image definition {gallery}/{definition} cannot back a confidential VM: {problem}; "
                             "delete it or pass another --name")
    versions = compute.gallery_image_versions
    current = _get(lambda: versions.get(rg, gallery, definition, version))
    if current is not None:
        source = az.text(getattr(getattr(current.storage_profile, "source", None), "id", ""))
        state = az.text(current.provisioning_state)
        if state == "Succeeded" and source.lower() == image_id.lower() and not replace:
            return str(current.id)
        if state == "Succeeded" and not replace:
            raise BuildError(f"gallery image version {gallery}/{definition}/{version} already exists from {source}; "
                             "pass --replace to publish this image in its place")
        versions.begin_delete(rg, gallery, definition, version).result()
    body = {
        "location": config.region,
        "tags": to_azure_tags(tags),
        "properties": {
            "storageProfile": {"source": {"id": image_id}},
            "publishingProfile": {"targetRegions": [{"name": config.region, "regionalReplicaCount": 1}]},
        },
    }
    try:
        made = versions.begin_create_or_update(rg, gallery, definition, version, body).result()
    except AzureError as exc:
        try:  # no half-made version left behind
            _get(lambda: versions.begin_delete(rg, gallery, definition, version).result())
        except AzureError as cleanup:
            raise BuildError(f"creating gallery image version {gallery}/{definition}/{version}: {az.describe(exc)}; "
                             f"deleting the incomplete version also failed: {az.describe(cleanup)}") from None
        raise
    return str(made.id)
