"""The ARM calls the azure provider makes: REST paths, api-versions and JSON bodies over azure-core's pipeline.

Why not the generated ``ComputeManagementClient``/``NetworkManagementClient``:
importing them loads their model modules (thousands of classes), about
40 MiB of an idle daemon's memory (azure.mgmt.compute ~14.5 MiB,
azure.mgmt.network ~27 MiB) for the dozen operations a provider uses.
ARM's REST paths and api-versions are its public contract, so this module
states them once and sends plain JSON (camelCase, ``properties`` nested, no
``None`` fields: what the SDK's serializer sent). Everything else stays the
libraries': azure-mgmt-core's ``ARMPipelineClient`` with the policies the
generated clients use (retries honouring ``Retry-After``, ARM challenge
authentication, user agent, logging, our telemetry hooks), azure-core's
``ItemPaged`` for ``nextLink`` paging and ``LROPoller`` + ``ARMPolling`` for
long-running operations. Errors are the SDK's too: ``map_error`` plus
``HttpResponseError`` with ``ARMErrorFormat`` (status and ARM error code).

The api-versions are those azure-mgmt-compute 39 and azure-mgmt-network 33
used, so the requests are the same as before. Results are the JSON ARM sent.
"""

from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import quote

from azure.core.exceptions import (
    ClientAuthenticationError, HttpResponseError, ResourceExistsError, ResourceNotFoundError,
    ResourceNotModifiedError, map_error,
)
from azure.core.paging import ItemPaged
from azure.core.pipeline import PipelineResponse
from azure.core.polling import LROPoller
from azure.core.rest import HttpRequest
from azure.mgmt.core import ARMPipelineClient
from azure.mgmt.core.exceptions import ARMErrorFormat
from azure.mgmt.core.polling.arm_polling import ARMPolling

Json = dict[str, Any]

# api-versions (azure-mgmt-compute 39.0.0 / azure-mgmt-network 33.1.0 defaults).
COMPUTE = "2026-04-01"  # virtualMachines, images
DISKS = "2026-03-02"
GALLERIES = "2026-03-03"  # galleries/images/versions, shared and community gallery image versions
SKUS = "2021-07-01"
NETWORK = "2026-03-01"

_ERRORS = {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError,
           304: ResourceNotModifiedError}
_ACCEPT = {"Accept": "application/json"}


def _seg(value: str) -> str:
    """A path segment, quoted like the SDK's serializer (nothing is safe)."""
    return quote(str(value), safe="")


class Arm:
    """ARM operations on one subscription through ``pipeline``; blocking (run them in a worker thread)."""

    def __init__(self, pipeline: ARMPipelineClient, subscription_id: str, polling_interval: float) -> None:
        self.pipeline = pipeline
        self.subscription_id = subscription_id
        self.polling_interval = polling_interval

    def close(self) -> None:
        self.pipeline.close()

    # ------------------------------------------------------------- plumbing

    def _rg(self, resource_group: str, provider: str, *segments: str) -> str:
        return (f"/subscriptions/{_seg(self.subscription_id)}/resourceGroups/{_seg(resource_group)}"
                f"/providers/{provider}/" + "/".join(_seg(s) if i % 2 else s for i, s in enumerate(segments)))

    def _run(self, request: HttpRequest, ok: Iterable[int]) -> PipelineResponse[Any, Any]:
        # The generated clients run their requests the same way (the pipeline's own entry point).
        response: PipelineResponse[Any, Any] = self.pipeline._pipeline.run(request)
        status = response.http_response.status_code
        if status not in ok:
            map_error(status_code=status, response=response.http_response, error_map=_ERRORS)
            raise HttpResponseError(response=response.http_response, error_format=ARMErrorFormat)
        return response

    def _request(self, method: str, path: str, api_version: str, *, accept: bool = True,
                 params: dict[str, Any] | None = None, body: Json | None = None) -> HttpRequest:
        return HttpRequest(method, self.pipeline.format_url(path), params={"api-version": api_version, **(params or {})},
                           headers=dict(_ACCEPT) if accept else {}, json=body)

    def _get(self, path: str, api_version: str) -> Json:
        result: Json = self._run(self._request("GET", path, api_version), (200,)).http_response.json()
        return result

    def _list(self, path: str, api_version: str, params: dict[str, Any] | None = None) -> ItemPaged[Json]:
        def get_next(next_link: str | None = None) -> PipelineResponse[Any, Any]:
            if next_link:  # as ARM gave it (it carries the api-version and any skip token)
                return self._run(HttpRequest("GET", self.pipeline.format_url(next_link)), (200,))
            return self._run(self._request("GET", path, api_version, params=params), (200,))

        def extract(response: PipelineResponse[Any, Any]) -> tuple[str | None, Iterable[Json]]:
            data = response.http_response.json()
            return data.get("nextLink") or None, iter(data.get("value") or [])

        return ItemPaged(get_next, extract)

    def _poller(self, initial: PipelineResponse[Any, Any], with_result: bool) -> LROPoller[Any]:
        def output(response: PipelineResponse[Any, Any]) -> Json | None:
            return response.http_response.json() if with_result else None

        return LROPoller(self.pipeline, initial, output, ARMPolling(self.polling_interval))

    def _begin_put(self, path: str, api_version: str, body: Json) -> LROPoller[Json]:
        initial = self._run(self._request("PUT", path, api_version, body=body), (200, 201))
        return self._poller(initial, with_result=True)

    def _begin_delete(self, path: str, api_version: str) -> LROPoller[None]:
        initial = self._run(self._request("DELETE", path, api_version, accept=False), (200, 202, 204))
        return self._poller(initial, with_result=False)

    # ------------------------------------------------------ virtual machines

    def _vm(self, rg: str, name: str) -> str:
        return self._rg(rg, "Microsoft.Compute", "virtualMachines", name)

    def virtual_machine_get(self, rg: str, name: str) -> Json:
        return self._get(self._vm(rg, name), COMPUTE)

    def virtual_machines_list(self, rg: str) -> ItemPaged[Json]:
        return self._list(self._rg(rg, "Microsoft.Compute", "virtualMachines"), COMPUTE)

    def virtual_machine_begin_create_or_update(self, rg: str, name: str, body: Json) -> LROPoller[Json]:
        return self._begin_put(self._vm(rg, name), COMPUTE, body)

    def virtual_machine_begin_delete(self, rg: str, name: str) -> LROPoller[None]:
        return self._begin_delete(self._vm(rg, name), COMPUTE)

    def virtual_machine_retrieve_boot_diagnostics_data(self, rg: str, name: str, expiry_minutes: int) -> Json:
        """SAS URIs of the VM's boot diagnostics blobs (``serialConsoleLogBlobUri``...)."""
        request = self._request("POST", self._vm(rg, name) + "/retrieveBootDiagnosticsData", COMPUTE,
                                params={"sasUriExpirationTimeInMinutes": expiry_minutes})
        result: Json = self._run(request, (200,)).http_response.json()
        return result

    # ------------------------------------------------------- other compute

    def disk_begin_delete(self, rg: str, name: str) -> LROPoller[None]:
        return self._begin_delete(self._rg(rg, "Microsoft.Compute", "disks", name), DISKS)

    def resource_skus_list(self, filter: str) -> ItemPaged[Json]:
        return self._list(f"/subscriptions/{_seg(self.subscription_id)}/providers/Microsoft.Compute/skus", SKUS,
                          {"$filter": filter})

    def image_get(self, rg: str, name: str) -> Json:
        return self._get(self._rg(rg, "Microsoft.Compute", "images", name), COMPUTE)

    def gallery_image_version_get(self, rg: str, gallery: str, image: str, version: str) -> Json:
        return self._get(self._rg(rg, "Microsoft.Compute", "galleries", gallery, "images", image,
                                  "versions", version), GALLERIES)

    def location_gallery_image_version_get(self, kind: str, location: str, gallery: str, image: str,
                                           version: str) -> Json:
        """A direct-shared (``kind="sharedGalleries"``) or community (``"communityGalleries"``) image version."""
        path = (f"/subscriptions/{_seg(self.subscription_id)}/providers/Microsoft.Compute/locations/{_seg(location)}"
                f"/{kind}/{_seg(gallery)}/images/{_seg(image)}/versions/{_seg(version)}")
        return self._get(path, GALLERIES)

    # ------------------------------------------------------------- network

    def _nic(self, rg: str, name: str) -> str:
        return self._rg(rg, "Microsoft.Network", "networkInterfaces", name)

    def network_interface_get(self, rg: str, name: str) -> Json:
        return self._get(self._nic(rg, name), NETWORK)

    def network_interfaces_list(self, rg: str) -> ItemPaged[Json]:
        return self._list(self._rg(rg, "Microsoft.Network", "networkInterfaces"), NETWORK)

    def network_interface_begin_create_or_update(self, rg: str, name: str, body: Json) -> LROPoller[Json]:
        return self._begin_put(self._nic(rg, name), NETWORK, body)

    def network_interface_begin_delete(self, rg: str, name: str) -> LROPoller[None]:
        return self._begin_delete(self._nic(rg, name), NETWORK)

    def subnet_get(self, rg: str, vnet: str, name: str) -> Json:
        return self._get(self._rg(rg, "Microsoft.Network", "virtualNetworks", vnet, "subnets", name), NETWORK)

    def network_security_group_get(self, rg: str, name: str) -> Json:
        return self._get(self._rg(rg, "Microsoft.Network", "networkSecurityGroups", name), NETWORK)

    def security_rules_list(self, rg: str, nsg: str) -> ItemPaged[Json]:
        return self._list(self._rg(rg, "Microsoft.Network", "networkSecurityGroups", nsg, "securityRules"), NETWORK)

    def security_rule_begin_create_or_update(self, rg: str, nsg: str, name: str, body: Json) -> LROPoller[Json]:
        return self._begin_put(self._rg(rg, "Microsoft.Network", "networkSecurityGroups", nsg, "securityRules", name),
                               NETWORK, body)


def properties(resource: Json | None) -> Json:
    """A resource's ``properties`` ({} when absent)."""
    return (resource or {}).get("properties") or {}
