"""What a namespace VM's init imports ahead of its steps, so that no VM pays for it on its own clock.

The local provider's fork server calls ``preload`` once: every VM it forks starts with the
steps' modules imported, OpenSSL initialised and pyroute2's message tables compiled (issue 16: one interpreter per
node, not per VM). A pool VM that was not forked from it (a test running the init directly)
imports what follows its claim while it waits (``import_after_claim``).
"""

from __future__ import annotations

import contextlib


def preload() -> None:
    """Import every step's modules and initialise what each VM would otherwise initialise itself."""
    import ssl

    import uvloop  # noqa: F401 - the init's loop
    import yaml  # noqa: F401 - process-user-data parses the user data with it (cloudadaptor.userdata imports it lazily)

    from cloudadaptor.commandline import setup_logging  # noqa: F401
    from cloudadaptor.podvm import claim, process_user_data  # noqa: F401

    import_after_claim()
    # OpenSSL initialises itself (configuration, algorithm tables) on the first context a process makes:
    # done here once, not in every VM's forwarder (its server context).
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    compile_netlink_tables()
    rehearse_pod_network()


def rehearse_pod_network() -> bool:
    """Run the pod network step once, in a throwaway netns of a thread of its own.

    What a process's first netlink requests cost beyond their later ones (pyroute2's lazily
    built objects, its specialised bytecode, the classes compiled above) is then paid once
    here, not by every VM (~1.5 ms of each VM's CPU). Nothing outside that netns changes: it
    holds no link but lo and the rehearsal's VXLAN device, and it goes when the thread ends.
    Whether it ran: failures are ignored (each VM's own step reports its own).
    """
    import threading

    from pyroute2 import IPRoute

    from cloudadaptor import linuxns
    from cloudadaptor.podconfig import PodInterface, PodNeighbour, PodNetworkConfig, PodRoute
    from cloudadaptor.podnetwork import vmside

    pod = PodInterface("eth0", "02:00:00:00:00:02", 1500, ("203.0.113.2/24", "2001:db8::2/128"),
                       routes=(PodRoute("0.0.0.0/0", gateway="203.0.113.1"),),
                       neighbours=(PodNeighbour("203.0.113.1", "02:00:00:00:00:01"),))
    network = PodNetworkConfig(pod, worker_ip="192.0.2.1", vni=1, vxlan_port=4789)

    ran: list[bool] = []

    def rehearse() -> None:
        with contextlib.suppress(Exception):
            linuxns.unshare(linuxns.CLONE_NEWNET)  # this thread's alone
            with IPRoute() as ipr:  # "podns" is the thread's netns too
                vmside.setup_vm_network(network, "/proc/thread-self/ns/net", podns_ipr=ipr)
                ran.append(True)

    thread = threading.Thread(target=rehearse, name="rehearse-pod-network")
    thread.start()
    thread.join()
    return bool(ran)


def compile_netlink_tables() -> None:
    """Compile the NLA tables of the netlink messages the pod network step sends and reads.

    pyroute2 compiles a message class's attribute table on its first instance, once per
    class and process: ~200 classes (links, VXLAN data, addresses, routes, neighbours, the
    peer filter's nftables rules). Compiled here, every VM finds them compiled (about a
    millisecond less per VM, and fewer of the fork server's pages copied).
    """
    from pyroute2.netlink import nlmsg_base, nlmsgerr
    from pyroute2.netlink.nfnetlink import nfgen_msg
    from pyroute2.netlink.nfnetlink.nftsocket import nft_chain_msg, nft_rule_msg, nft_table_msg
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.ndmsg import ndmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    seen: set[type] = set()

    def compile_tree(cls: type) -> None:
        if cls in seen:
            return
        seen.add(cls)
        with contextlib.suppress(Exception):  # a class that needs arguments compiles on first use instead
            cls()
        for name in dir(cls):  # the nested attribute classes, named in the table
            nested = getattr(cls, name, None)
            if isinstance(nested, type) and issubclass(nested, nlmsg_base):
                compile_tree(nested)

    for root in (nlmsgerr, ifinfmsg, ifaddrmsg, rtmsg, ndmsg, nfgen_msg, nft_table_msg, nft_chain_msg, nft_rule_msg):
        compile_tree(root)


def import_after_claim() -> None:
    """What runs after a pool VM's claim: the pod network step and the forwarder."""
    import cloudadaptor.podnetwork.vmside  # noqa: F401

    import_forwarder()


def import_forwarder() -> None:
    import cloudadaptor.podvm.forwarder  # noqa: F401 - imports certrenewal and tls too
