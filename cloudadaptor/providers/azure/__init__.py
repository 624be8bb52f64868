"""The ``azure`` provider: pod VMs through azure-identity and ARM's REST API on azure-mgmt-core.

Modules: ``config`` (keys, typed config, resource ids — no SDK import),
``tags`` (tag name mapping), ``client`` (credential, ARM pipeline, retry policy,
error helpers), ``arm`` (the ARM calls: paths, api-versions, JSON; why not
the generated SDK clients), ``network`` (NICs, NSG rules), ``vms`` (VM body, size catalog),
``checks`` (startup checks), ``provider`` (``AzureProvider``), ``command``
(the ``cloud-api-adaptor azure`` operator subcommands).

Importing this package imports no Azure SDK: the registry loads
``provider:AzureProvider`` only when ``CLOUD_PROVIDER=azure``.
"""
