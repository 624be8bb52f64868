"""PeerPodConfig: the per-node pod VM limit and the nodes it applies to, as the OpenShift docs set them.

A PeerPodConfig (``confidentialcontainers.org/v1alpha1``, namespaced) says "every
node matching ``spec.nodeSelector`` may run ``spec.limit`` pod VMs" (``limit``
is a string of digits, as in the docs). This module is the pure part: reading
and checking a spec, and deciding what each node should carry
(``plan``); ``cloudadaptor.k8s.nodelimits`` applies the plan and writes the
statuses.

Rules ``plan`` follows:

- a node selected by valid PeerPodConfigs gets the lowest of their limits (ties:
  the first by namespace/name), and the annotation naming that config;
- a node that carries the annotation and is selected by none loses the
  resource: marked ``none`` while any PeerPodConfig exists, handed back to its
  adaptor (annotation removed) when none is left;
- a node whose annotation names a PeerPodConfig that is now invalid is left as
  it is (bad input never changes a node);
- a node never selected (no annotation) is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cloudadaptor.k8s.capacity import UNSELECTED
from cloudadaptor.k8s.peerpods import GROUP, VERSION

PLURAL = "peerpodconfigs"
KIND = "PeerPodConfig"
API_VERSION = f"{GROUP}/{VERSION}"
LIMIT_PATTERN = re.compile(r"^[0-9]+$")  # the CRD's pattern too (deploy/base/peerpodconfig-crd.yaml)
MAX_LIMIT_DIGITS = 6  # the CRD's maxLength: up to 999999 pod VMs per node
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_NAME = re.compile(rf"^{_NAME}$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

JSON = dict[str, Any]


@dataclass(frozen=True)
class ConfigSpec:
    """A PeerPodConfig whose spec is usable."""

    ref: str  # namespace/name
    limit: int
    node_selector: Mapping[str, str]


@dataclass(frozen=True)
class Invalid:
    """A PeerPodConfig whose spec is not usable: what is wrong, one line per problem."""

    ref: str
    problems: tuple[str, ...]


def ref_of(item: JSON) -> str:
    meta = item.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def label_key_problem(key: str) -> str | None:
    """What is wrong with a label key (``[prefix/]name``), None when it is valid."""
    prefix, _, name = key.rpartition("/")
    if "/" in prefix or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
        return f"label key {key!r}: the prefix must be a DNS subdomain (lower case, at most 253 characters)"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (f"label key {key!r}: the name must be 1-63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def label_value_problem(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return f"label {key!r}: the value must be a string, got {type(value).__name__}"
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (f"label {key!r}: value {value[:70]!r} must be empty or 1-63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def parse(item: JSON) -> ConfigSpec | Invalid:
    """The usable spec of a PeerPodConfig, or every problem with it (the API schema catches most first)."""
    ref, spec = ref_of(item), item.get("spec")
    if not isinstance(spec, dict):
        return Invalid(ref, ("spec: required, an object with limit and nodeSelector",))
    problems = []
    limit = spec.get("limit")
    if not isinstance(limit, str) or not LIMIT_PATTERN.match(limit) or len(limit) > MAX_LIMIT_DIGITS:
        problems.append(f"spec.limit: {str(limit)[:40]!r} is not a non-negative integer string of at most "
                        f"{MAX_LIMIT_DIGITS} digits (for example \"10\")")
    selector = spec.get("nodeSelector")
    if not isinstance(selector, dict) or not selector:
        problems.append("spec.nodeSelector: required, a map of node labels with at least one entry "
                        "(for example node-role.kubernetes.io/kata-oc: \"\")")
    else:
        for key, value in selector.items():
            problem = label_key_problem(str(key)) or label_value_problem(str(key), value)
            if problem:
                problems.append(f"spec.nodeSelector: {problem}")
    if problems:
        return Invalid(ref, tuple(problems))
    assert isinstance(limit, str) and isinstance(selector, dict)
    return ConfigSpec(ref, int(limit), dict(selector))


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Equality selection, as a pod's nodeSelector: every pair present on the node."""
    return all(labels.get(key) == value for key, value in selector.items())


@dataclass(frozen=True)
class NodeView:
    """What the plan needs of a Node."""

    name: str
    labels: Mapping[str, str]
    annotation: str | None  # CONFIG_ANNOTATION, None when absent


@dataclass(frozen=True)
class Desired:
    """What a node should carry: ``annotation`` None = removed; ``limit`` None = resource removed."""

    annotation: str | None
    limit: int | None


@dataclass
class Plan:
    desired: dict[str, Desired] = field(default_factory=dict)  # node -> what to write (nodes to touch only)
    contenders: dict[str, list[ConfigSpec]] = field(default_factory=dict)  # node -> valid configs selecting it
    frozen: dict[str, str] = field(default_factory=dict)  # node -> the invalid config it keeps


def plan(configs: list[ConfigSpec | Invalid], nodes: list[NodeView]) -> Plan:
    """Decide every node's limit (the module docstring's rules). Pure: no API call."""
    valid = sorted((c for c in configs if isinstance(c, ConfigSpec)), key=lambda c: (c.limit, c.ref))
    invalid = {c.ref for c in configs if isinstance(c, Invalid)}
    result = Plan()
    for node in nodes:
        if node.annotation in invalid:
            result.frozen[node.name] = node.annotation
            continue
        matching = [c for c in valid if selects(c.node_selector, node.labels)]
        if matching:
            result.contenders[node.name] = matching
            result.desired[node.name] = Desired(matching[0].ref, matching[0].limit)  # the lowest limit wins
        elif node.annotation is not None:
            result.desired[node.name] = Desired(UNSELECTED, None) if configs else Desired(None, None)
    return result
