"""A local Kubernetes API endpoint for tests: a fake in the moto sense.

``KubeApiServer`` serves the REST paths a real API server serves, for the
resources tests need — pods, nodes (with their ``status`` subresource),
PeerPods, PeerPodConfigs (with ``status``), Leases, secrets and service accounts — over HTTP (or HTTPS with ``ssl_context`` and ``ca_file``) on 127.0.0.1, storing
objects in memory. Real clients (kubernetes_asyncio) are pointed at it
through ``configuration()`` or a kubeconfig file written by ``write_kubeconfig``.

API semantics it honours (the ones our code relies on):

- ``metadata.uid``, ``resourceVersion`` (one counter for all writes),
  ``creationTimestamp``, ``generation`` (raised by a change of ``spec`` of a
  resource with a status subresource); ``generateName``.
- Optimistic concurrency: PUT, or a PATCH whose result carries a
  ``metadata.resourceVersion``, with a stale resourceVersion is 409 Conflict.
- Finalizers: DELETE of an object with finalizers only sets
  ``deletionTimestamp``; the object disappears when the last finalizer is
  removed. A finalizer cannot be added to an object being deleted (422).
- Status subresources: the main resource ignores ``status`` changes, the
  ``/status`` path changes only ``status``.
- Patches: ``application/json-patch+json`` (RFC 6902),
  ``application/merge-patch+json`` (RFC 7386); strategic merge patch is
  accepted for built-in kinds and applied as a merge patch (lists are
  replaced — enough for the maps our code patches) and refused (415) for
  custom resources, as the real server does.
- List with ``labelSelector`` (``k=v``, ``k!=v``, ``k``) and ``fieldSelector``
  (``a.b=v`` on any dotted path), namespaced and cluster-wide.
- Background garbage collection (``garbage_collect=True``): when an object
  disappears, objects whose ``ownerReferences`` name its uid are deleted.

Not implemented: watch (400), server-side apply, admission, authentication
(any bearer token is accepted; ``requests`` records it).

Tests can inject failures (``fail(method, path_regex, status, times)``) and
read ``requests`` (method, path, content type) to assert what was called.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import re
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """A REST resource: ``group`` is "" for the core API."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODS = Resource("", "v1", "pods", "Pod", True)
NODES = Resource("", "v1", "nodes", "Node", False)
PEERPODS = Resource("confidentialcontainers.org", "v1alpha1", "peerpods", "PeerPod", True)
SECRETS = Resource("", "v1", "secrets", "Secret", True, status_subresource=False)
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount", True, status_subresource=False)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False)
EVENTS = Resource("", "v1", "events", "Event", True, status_subresource=False)  # core/v1 Events on pods
PEERPODCONFIGS = Resource("confidentialcontainers.org", "v1alpha1", "peerpodconfigs", "PeerPodConfig", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True, status_subresource=False)
DEFAULT_RESOURCES = (PODS, NODES, PEERPODS, SECRETS, SERVICEACCOUNTS, NAMESPACES, EVENTS, PEERPODCONFIGS, LEASES)


class ApiError(Exception):
    """Answered as a ``Status`` object with ``code``."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass
class _Injected:
    method: str
    path: re.Pattern[str]
    status: int
    times: int


@dataclass
class RecordedRequest:
    method: str
    path: str
    content_type: str
    query: dict[str, str] = field(default_factory=dict)
    authorization: str = ""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (returns a new value)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _without_rv(obj: JSON) -> JSON:
    clone = copy.deepcopy(obj)
    clone.get("metadata", {}).pop("resourceVersion", None)
    return clone


def _selector_matches(selector: str, get: Any) -> bool:
    """Equality-based selector ``a=b,c!=d,e`` against ``get(key) -> str | None``."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if get(key.strip()) != value.strip():
                return False
        elif get(term) is None:
            return False
    return True


def _field(obj: JSON, path: str) -> str | None:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return None if value is None else str(value)


class ObjectStore:
    """The objects and the rules of writing them; the HTTP layer is ``KubeApiServer``."""

    def __init__(self, resources: tuple[Resource, ...], garbage_collect: bool) -> None:
        self.resources = {(r.group, r.version, r.plural): r for r in resources}
        self.objects: dict[tuple[str, str, str], JSON] = {}  # (plural, namespace, name) -> object
        self.garbage_collect = garbage_collect
        self._rv = 100

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _key(self, res: Resource, namespace: str, name: str) -> tuple[str, str, str]:
        return (res.plural, namespace if res.namespaced else "", name)

    def get(self, res: Resource, namespace: str, name: str) -> JSON:
        obj = self.objects.get(self._key(res, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
        return obj

    def list(self, res: Resource, namespace: str | None, labels: str = "", fields: str = "") -> list[JSON]:
        items = []
        for (plural, ns, _), obj in sorted(self.objects.items()):
            if plural != res.plural or (namespace and ns != namespace):
                continue
            obj_labels = obj["metadata"].get("labels") or {}
            if _selector_matches(labels, obj_labels.get) and _selector_matches(fields, lambda p: _field(obj, p)):
                items.append(obj)
        return items

    def create(self, res: Resource, namespace: str, body: JSON, seeding: bool = False) -> JSON:
        """POST semantics; ``seeding`` keeps ``status`` and ``deletionTimestamp`` as given (test set-up)."""
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if res.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the request")
            meta["namespace"] = namespace
        key = self._key(res, namespace, meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        if res.status_subresource and not seeding:
            obj.pop("status", None)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_now(), generation=1)
        if not seeding:
            meta.pop("deletionTimestamp", None)
        self.objects[key] = obj
        return obj

    def write(self, res: Resource, namespace: str, name: str, new: JSON, *, status_only: bool) -> JSON:
        """Store ``new`` as the next version of an existing object (PUT and PATCH)."""
        old = self.get(res, namespace, name)
        meta = new.setdefault("metadata", {})
        given_rv = meta.get("resourceVersion")
        if given_rv and given_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": '
                           "the object has been modified; please apply your changes to the latest version and try again")
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name in the URL")
        if status_only:
            result = copy.deepcopy(old)
            result["status"] = copy.deepcopy(new.get("status"))
        else:
            result = copy.deepcopy(new)
            if res.status_subresource:
                result["status"] = copy.deepcopy(old.get("status"))
                if result["status"] is None:
                    result.pop("status")
            self._check_finalizers(old, result)
        rmeta = result.setdefault("metadata", {})
        for immutable in ("uid", "creationTimestamp", "deletionTimestamp", "namespace", "name", "generation"):
            if immutable in old["metadata"]:
                rmeta[immutable] = old["metadata"][immutable]
            else:
                rmeta.pop(immutable, None)
        result["apiVersion"], result["kind"] = res.api_version, res.kind
        if res.status_subresource and result.get("spec") != old.get("spec"):
            rmeta["generation"] = old["metadata"].get("generation", 1) + 1  # as the server: spec changes only
        if _without_rv(result) == _without_rv(old):
            return old  # no change: no new resourceVersion, as the real server
        rmeta["resourceVersion"] = self._next_rv()
        self.objects[self._key(res, namespace, name)] = result
        if rmeta.get("deletionTimestamp") and not rmeta.get("finalizers"):
            self._remove(res, namespace, name)
        return result

    @staticmethod
    def _check_finalizers(old: JSON, new: JSON) -> None:
        if not old["metadata"].get("deletionTimestamp"):
            return
        added = set(new["metadata"].get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
        if added:
            raise ApiError(422, "Forbidden", f"no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}")

    def delete(self, res: Resource, namespace: str, name: str) -> JSON:
        obj = self.get(res, namespace, name)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                obj["metadata"]["resourceVersion"] = self._next_rv()
            return obj
        self._remove(res, namespace, name)
        return obj

    def _remove(self, res: Resource, namespace: str, name: str) -> None:
        obj = self.objects.pop(self._key(res, namespace, name))
        if not self.garbage_collect:
            return
        uid = obj["metadata"]["uid"]
        for (plural, ns, dep_name), dep in list(self.objects.items()):
            owners = dep["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in owners):
                dep_res = next(r for r in self.resources.values() if r.plural == plural)
                if (plural, ns, dep_name) in self.objects:
                    self.delete(dep_res, ns, dep_name)


class KubeApiServer:
    """The HTTP(S) front of an ``ObjectStore``; ``await start()`` then use ``url``."""

    def __init__(
        self,
        *,
        resources: tuple[Resource, ...] = DEFAULT_RESOURCES,
        garbage_collect: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.store = ObjectStore(resources, garbage_collect)
        if NAMESPACES in resources:  # every cluster has it; its uid is the cluster's identity
            self.store.create(NAMESPACES, "", {"metadata": {"name": "kube-system"}}, seeding=True)
        self.requests: list[RecordedRequest] = []
        self._ssl = ssl_context
        self._ca_file = ca_file
        self._injected: list[_Injected] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------ life cycle
    async def start(self) -> str:
        """Listen on 127.0.0.1 (a free port); returns the base URL."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KubeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --------------------------------------------------------- client config
    def configuration(self, token: str = "test-token"):  # -> kubernetes_asyncio.client.Configuration
        """A kubernetes_asyncio Configuration pointing at this server."""
        from kubernetes_asyncio.client import Configuration

        config = Configuration(host=self.url, api_key={"BearerToken": token}, api_key_prefix={"BearerToken": "Bearer"})
        if self._ca_file is not None:
            config.ssl_ca_cert = str(self._ca_file)
        return config

    def kubeconfig(self, token: str = "test-token") -> JSON:
        """A kubeconfig (as a dict) with one context for this server."""
        cluster: JSON = {"server": self.url}
        if self._ca_file is not None:
            cluster["certificate-authority"] = str(self._ca_file)
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
        }

    def write_kubeconfig(self, path: Path, token: str = "test-token") -> Path:
        path.write_text(json.dumps(self.kubeconfig(token)))
        return path

    # ------------------------------------------------------------- test aids
    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests matching with ``status`` (a Status body)."""
        self._injected.append(_Injected(method.upper(), re.compile(path_regex), status, times))

    def seed(self, resource: Resource, obj: JSON) -> JSON:
        """Insert an object directly (``status`` and ``deletionTimestamp`` kept), as if others had written it."""
        namespace = obj.get("metadata", {}).get("namespace", "default") if resource.namespaced else ""
        return copy.deepcopy(self.store.create(resource, namespace, obj, seeding=True))

    def get(self, resource: Resource, name: str, namespace: str = "") -> JSON | None:
        """The stored object (a copy), or None."""
        obj = self.store.objects.get(self.store._key(resource, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def all(self, resource: Resource) -> list[JSON]:
        return copy.deepcopy(self.store.list(resource, None))

    def delete(self, resource: Resource, name: str, namespace: str = "") -> None:
        """DELETE as a client would (finalizers honoured, garbage collected)."""
        self.store.delete(resource, namespace, name)

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.requests.append(RecordedRequest(request.method, path, request.content_type, dict(request.query),
                                             request.headers.get("Authorization", "")))
        try:
            self._maybe_inject(request.method, path)
            code, body = await self._dispatch(request, path)
            return _json(body, code)
        except ApiError as exc:
            return _status(exc.code, exc.reason, exc.message)

    def _maybe_inject(self, method: str, path: str) -> None:
        for rule in self._injected:
            if rule.times > 0 and rule.method == method and rule.path.search(path):
                rule.times -= 1
                reason = {409: "Conflict", 500: "InternalError", 503: "ServiceUnavailable", 403: "Forbidden"}.get(rule.status, "Injected")
                raise ApiError(rule.status, reason, f"injected failure {rule.status}")

    def _route(self, path: str) -> tuple[Resource, str | None, str | None, str | None]:
        """(resource, namespace, name, subresource) of a REST path."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        res = self.store.resources.get((group, version, rest[0]))
        if res is None or (namespace is not None and not res.namespaced):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and (sub != "status" or not res.status_subresource):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if res.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        return res, namespace, name, sub

    async def _dispatch(self, request: web.Request, path: str) -> tuple[int, JSON]:
        """(HTTP status, body) of a request: 201 for a create, 200 otherwise."""
        res, namespace, name, sub = self._route(path)
        method = request.method
        if request.query.get("watch") in ("true", "1"):
            raise ApiError(400, "BadRequest", "watch is not supported by this fake API server; poll instead")
        if name is None:
            if method == "GET":
                return 200, self._list(res, namespace, request)
            if method == "POST":
                if res.namespaced and namespace is None:
                    raise ApiError(405, "MethodNotAllowed", "create needs a namespace")
                return 201, copy.deepcopy(self.store.create(res, namespace or "", await _body(request)))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a collection here")
        ns = namespace or ""
        if method == "GET":
            return 200, copy.deepcopy(self.store.get(res, ns, name))
        if method == "PUT":
            return 200, copy.deepcopy(self.store.write(res, ns, name, await _body(request), status_only=sub == "status"))
        if method == "PATCH":
            patched = _apply_patch(res, self.store.get(res, ns, name), request.content_type, await _body(request, any_json=True))
            return 200, copy.deepcopy(self.store.write(res, ns, name, patched, status_only=sub == "status"))
        if method == "DELETE" and sub is None:
            return 200, copy.deepcopy(self.store.delete(res, ns, name))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed here")

    def _list(self, res: Resource, namespace: str | None, request: web.Request) -> JSON:
        items = self.store.list(res, namespace, request.query.get("labelSelector", ""), request.query.get("fieldSelector", ""))
        return {
            "apiVersion": res.api_version, "kind": f"{res.kind}List",
            "metadata": {"resourceVersion": str(self.store._rv)},
            "items": copy.deepcopy(items),
        }


def _apply_patch(res: Resource, current: JSON, content_type: str, patch: Any) -> JSON:
    if content_type == "application/json-patch+json":
        import jsonpatch

        if not isinstance(patch, list):
            raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
        try:
            return jsonpatch.apply_patch(current, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from None
    if content_type == "application/merge-patch+json" or (
        content_type == "application/strategic-merge-patch+json" and not res.group
    ):
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        return merge_patch(current, patch)
    raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types "
                   f"include: application/json-patch+json, application/merge-patch+json (got {content_type!r})")


async def _body(request: web.Request, any_json: bool = False) -> Any:
    try:
        body = json.loads(await request.text())
    except ValueError:
        raise ApiError(400, "BadRequest", "the request body is not valid JSON") from None
    if not any_json and not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body must be a JSON object")
    return body


def _json(obj: JSON, code: int = 200) -> web.Response:
    return web.Response(status=code, text=json.dumps(obj), content_type="application/json")


def _status(code: int, reason: str, message: str) -> web.Response:
    return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}, code)

