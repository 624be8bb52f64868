"""Only the recorded peer may speak into a VXLAN tunnel (nftables, through pyroute2).

Linux VXLAN does not check a packet's sender against the device's remote: any
host that reaches UDP ``VXLAN_PORT`` with a frame carrying a pod's VNI would
inject it into the pod's network. Each tunnel end therefore gets its own
nftables table ``ppvx<VNI>`` in the netns where the VXLAN device's UDP socket
lives (the worker's netns; the VM's), with one rule on the input hook:

    udp dport VXLAN_PORT, VXLAN VNI == <vni>, source address != <peer>  ->  drop

The input hook sees packets after IP reassembly, so fragments cannot sneak past
the VNI match. One table per tunnel means no shared state: installing replaces
the table, removal deletes it, and a crash's leftovers are found by name
(``sweep``). Blocking: call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import OrderedDict
from typing import Any, Collection

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)
from pyroute2.nftables.main import NFTables

from cloudadaptor import netnsocket

CHAIN = "peer-only"
NF_DROP, NF_ACCEPT = 0, 1
_HOOK_INPUT = 1
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
_META_L4PROTO = 16
_BASE_NETWORK, _BASE_TRANSPORT = 1, 2
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}  # nfproto ip = 2, ip6 = 10
_TABLE = re.compile(r"ppvx(\d+)")
# VXLAN header (RFC 7348): flags(1) reserved(3) VNI(3) reserved(1), after the 8-byte UDP header.
_VNI_OFFSET = 8 + 4


def table_name(vni: int) -> str:
    return f"ppvx{vni}"


def install(vni: int, vxlan_port: int, peer: str, netns_path: str | None = None) -> None:
    """Drop VXLAN packets for ``vni`` on ``vxlan_port`` whose source is not ``peer``.

    One transaction replaces an earlier table of ``vni`` (of either family): no
    moment without a filter, and one nftables commit instead of one per object."""
    address = ipaddress.ip_address(peer)
    family = _FAMILY[address.version]
    saddr = (12, 4) if address.version == 4 else (8, 16)  # offset, length of the source address
    name = table_name(vni)
    rule = (
        _meta_l4proto_is(socket.IPPROTO_UDP)
        + _payload_cmp(_BASE_TRANSPORT, 2, vxlan_port.to_bytes(2, "big"))
        + _payload_cmp(_BASE_TRANSPORT, _VNI_OFFSET, vni.to_bytes(3, "big"))
        + _payload_cmp(_BASE_NETWORK, saddr[0], address.packed, op=1)  # NFT_CMP_NEQ
        + [_expr("immediate", dreg=0, data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", NF_DROP)]})]})]
    )
    hook = {"attrs": [["NFTA_HOOK_HOOKNUM", _HOOK_INPUT], ["NFTA_HOOK_PRIORITY", 0]]}
    messages = [message for other in _FAMILY.values() for message in _delete_table(other, name)]
    messages += [
        _message(nft_table_msg, NFT_MSG_NEWTABLE, family, name=name),
        _message(nft_chain_msg, NFT_MSG_NEWCHAIN, family, table=name, name=CHAIN, hook=hook, type="filter",
                 policy=NF_ACCEPT),
        _message(nft_rule_msg, NFT_MSG_NEWRULE, family, table=name, chain=CHAIN, expressions=rule),
    ]
    netnsocket.in_netns(netns_path, lambda: _transaction(messages))


def remove(vni: int, netns_path: str | None = None) -> None:
    """Delete the table of ``vni`` (both families, one transaction); absent is fine."""
    messages = [message for family in _FAMILY.values() for message in _delete_table(family, table_name(vni))]
    netnsocket.in_netns(netns_path, lambda: _transaction(messages))


def installed(netns_path: str | None = None) -> list[int]:
    """VNIs that have a table here (for ``sweep``, diagnostics and tests)."""

    def run() -> list[int]:
        vnis = []
        for family in _FAMILY.values():
            with NFTables(nfgen_family=family) as nft:
                for table in nft.get_tables():
                    if table.get("nfgen_family") == family and (m := _TABLE.fullmatch(table.get("NFTA_TABLE_NAME") or "")):
                        vnis.append(int(m.group(1)))
        return sorted(vnis)

    return netnsocket.in_netns(netns_path, run)


def sweep(known_vnis: Collection[int], netns_path: str | None = None) -> list[str]:
    """Delete tables of VNIs not in ``known_vnis`` (a crash's leftovers); one line per table."""
    actions = []
    for vni in installed(netns_path):
        if vni not in known_vnis:
            remove(vni, netns_path)
            actions.append(f"deleted stale VXLAN peer filter {table_name(vni)}")
    return actions


# ----------------------------------------------------------------- helpers


def _expr(name: str, **data: Any) -> dict[str, Any]:
    attrs = [(f"NFTA_{name.upper()}_{key.upper()}", value) for key, value in OrderedDict(data).items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": attrs})]}


def _cmp(value: bytes, op: int = 0) -> dict[str, Any]:
    return _expr("cmp", sreg=1, op=op, data={"attrs": [("NFTA_DATA_VALUE", value)]})


def _meta_l4proto_is(proto: int) -> list[dict[str, Any]]:
    return [_expr("meta", dreg=1, key=_META_L4PROTO), _cmp(bytes([proto]))]


def _payload_cmp(base: int, offset: int, value: bytes, op: int = 0) -> list[dict[str, Any]]:
    return [_expr("payload", dreg=1, base=base, offset=offset, len=len(value)), _cmp(value, op)]


def _delete_table(family: int, name: str) -> list[Any]:
    """Delete table ``name`` whether or not it exists: adding an existing table
    changes nothing, so "add; delete" never fails (the ``nft -f`` idiom)."""
    return [_message(nft_table_msg, NFT_MSG_NEWTABLE, family, name=name),
            _message(nft_table_msg, NFT_MSG_DELTABLE, family, name=name)]


def _message(msg_class: Any, msg_type: int, family: int, **attrs: Any) -> Any:
    """One request of a batch, as ``NFTables.table()``/``chain()``/``rule()`` build it
    (those send each request in a transaction of its own)."""
    msg = msg_class()
    msg["attrs"] = [[msg_class.name2nla(key), value] for key, value in attrs.items()]
    msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
    create = NLM_F_CREATE | NLM_F_APPEND if msg_type != NFT_MSG_DELTABLE else 0
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | create
    msg["nfgen_family"] = family
    return msg


def _batch_marker(msg_type: int) -> Any:
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST
    return msg


def _transaction(messages: list[Any]) -> None:
    """Send ``messages`` as one nftables transaction: all apply or none (raises ``NetlinkError``)."""
    with NFTables() as nft:
        nft.nlm_request_batch([_batch_marker(NFNL_MSG_BATCH_BEGIN), *messages, _batch_marker(NFNL_MSG_BATCH_END)])
