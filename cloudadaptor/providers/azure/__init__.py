"""The ``azure`` provider: pod VMs through azure-identity and azure-mgmt-compute/-network.

Modules: ``config`` (keys, typed config, resource ids — no SDK import),
``tags`` (tag name mapping), ``client`` (credential, SDK clients, retry policy,
error helpers), ``network`` (NICs, NSG rules), ``vms`` (VM body, size catalog),
``checks`` (startup checks), ``provider`` (``AzureProvider``), ``command``
(the ``cloud-api-adaptor azure`` operator subcommands).

Importing this package imports no Azure SDK: the registry loads
``provider:AzureProvider`` only when ``CLOUD_PROVIDER=azure``.
"""
