"""What a namespace VM's init imports ahead of its steps, so that no VM pays for it on its own clock.

The local provider's fork server calls ``preload`` once: every VM it forks starts with the
steps' modules imported and OpenSSL and tempfile initialised (issue 16: one interpreter per
node, not per VM). A pool VM that was not forked from it (a test running the init directly)
imports what follows its claim while it waits (``import_after_claim``).
"""

from __future__ import annotations


def preload() -> None:
    """Import every step's modules and initialise what each VM would otherwise initialise itself."""
    import ssl
    import tempfile

    import uvloop  # noqa: F401 - the init's loop
    import yaml  # noqa: F401 - process-user-data parses the user data with it (cloudadaptor.userdata imports it lazily)

    from cloudadaptor.commandline import setup_logging  # noqa: F401
    from cloudadaptor.podvm import claim, process_user_data  # noqa: F401

    import_after_claim()
    # OpenSSL initialises itself (configuration, algorithm tables) on the first context a process makes,
    # and tempfile probes for its directory on first use: done here once, not in every VM's forwarder
    # (its server context; tls writes the PEM text to a private temporary directory to load it).
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tempfile.gettempdir()


def import_after_claim() -> None:
    """What runs after a pool VM's claim: the pod network step and the forwarder."""
    import cloudadaptor.podnetwork.vmside  # noqa: F401

    import_forwarder()


def import_forwarder() -> None:
    import cloudadaptor.podvm.forwarder  # noqa: F401 - imports certrenewal and tls too
