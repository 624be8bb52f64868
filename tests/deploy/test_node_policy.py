"""The admission policy that keeps each adaptor to its own node, evaluated: its CEL
expressions (as rendered by kustomize) run with cel-python against the admission
requests an adaptor on worker-1 would send — its own node and PeerPods pass, another
node's are refused, and so is a token without the node-name claim. Other users
(the controller, garbage collection) are not matched at all."""

from __future__ import annotations

from typing import Any

import celpy
import pytest
from celpy import celtypes

from cloudadaptor.k8s import peerpods
from rendering import NAMESPACE, Doc, find, render

ADAPTOR = f"system:serviceaccount:{NAMESPACE}:cloud-api-adaptor"
NODE_CLAIM = "authentication.kubernetes.io/node-name"
NODE_ANNOTATION = peerpods.ANN_NODE


def policy() -> Doc:
    return find(render("kubernetes-aws"), "ValidatingAdmissionPolicy")


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression)).evaluate(activation)


def admit(request: dict[str, Any], obj: Doc | None, old: Doc | None) -> list[str] | None:
    """None when the policy does not match the request; else the messages of failed validations."""
    spec = policy()["spec"]
    activation: dict[str, Any] = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(obj),
                                  "oldObject": celpy.json_to_cel(old)}
    if not all(bool(evaluate(c["expression"], activation)) for c in spec["matchConditions"]):
        return None
    variables: dict[celtypes.StringType, Any] = {}
    for variable in spec["variables"]:
        activation["variables"] = celtypes.MapType(variables)
        variables[celtypes.StringType(variable["name"])] = evaluate(variable["expression"], activation)
    activation["variables"] = celtypes.MapType(variables)
    failed = []
    for validation in spec["validations"]:
        result = evaluate(validation["expression"], activation)
        assert isinstance(result, celtypes.BoolType), f"{validation['expression']!r} gave {result!r}"
        if not result:
            failed.append(str(evaluate(validation["messageExpression"], activation)) if "messageExpression" in validation
                          else validation["message"])
    return failed


def request(operation: str, resource: str, *, user: str = ADAPTOR, node: str | None = "worker-1",
            subresource: str = "") -> dict[str, Any]:
    extra = {NODE_CLAIM: [node]} if node is not None else {}
    return {"operation": operation, "userInfo": {"username": user, "extra": extra},
            "resource": {"group": "" if resource == "nodes" else peerpods.GROUP, "version": "v1", "resource": resource},
            "subResource": subresource}


def node(name: str) -> Doc:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def peerpod(node_name: str | None) -> Doc:
    pod = peerpods.PodRef(namespace="default", name="web", uid="u-1", node_name=node_name or "", phase="Running", deleting=False)
    body = peerpods.peerpod_body(name="web-1", pod=pod, sandbox_id="s", node_name=node_name or "", instance_id="i-1",
                                 provider_name="aws")
    if node_name is None:
        del body["metadata"]["annotations"][NODE_ANNOTATION]
    return body


def test_an_adaptor_may_patch_the_status_of_its_own_node_only():
    assert admit(request("UPDATE", "nodes", subresource="status"), node("worker-1"), node("worker-1")) == []
    failed = admit(request("UPDATE", "nodes", subresource="status"), node("worker-2"), node("worker-2"))
    assert failed and "own node" in failed[0] and "worker-1" in failed[0]


@pytest.mark.parametrize("operation", ["CREATE", "UPDATE", "DELETE"])
def test_an_adaptor_may_write_the_peerpods_of_its_own_node(operation):
    new = None if operation == "DELETE" else peerpod("worker-1")
    old = None if operation == "CREATE" else peerpod("worker-1")
    assert admit(request(operation, "peerpods"), new, old) == []


@pytest.mark.parametrize("operation,new_node,old_node", [
    ("CREATE", "worker-2", None), ("CREATE", None, None),
    ("UPDATE", "worker-2", "worker-2"), ("UPDATE", "worker-1", "worker-2"), ("UPDATE", "worker-2", "worker-1"),
    ("DELETE", None, "worker-2"),
])
def test_an_adaptor_may_not_write_or_take_over_another_nodes_peerpods(operation, new_node, old_node):
    new = None if operation == "DELETE" else peerpod(new_node)
    old = None if operation == "CREATE" else peerpod(old_node)
    assert admit(request(operation, "peerpods"), new, old), f"{operation} of a PeerPod of {new_node or old_node} was allowed"


def test_a_token_without_the_node_claim_is_refused():
    failed = admit(request("CREATE", "peerpods", node=None), peerpod("worker-1"), None)
    assert failed and any(NODE_CLAIM in m for m in failed)


@pytest.mark.parametrize("user", [f"system:serviceaccount:{NAMESPACE}:peerpod-controller",
                                  "system:serviceaccount:kube-system:generic-garbage-collector",
                                  "system:serviceaccount:other:cloud-api-adaptor"])
def test_other_users_are_not_matched(user):
    assert admit(request("DELETE", "peerpods", user=user, node=None), None, peerpod("worker-2")) is None
