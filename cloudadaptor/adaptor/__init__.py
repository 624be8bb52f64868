"""The worker daemon: hypervisor service, sandbox lifecycle, state store, agent proxy."""
