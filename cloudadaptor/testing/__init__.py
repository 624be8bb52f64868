"""Test and demo support: private namespace, shim emulator, development agent."""
