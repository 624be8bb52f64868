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
