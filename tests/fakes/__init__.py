"""Test doubles of clouds and APIs: the ARM endpoint, the Kubernetes API, an SSH server,
the lifecycle tests' provider and pod network.

They live with the tests and are never installed: the wheel holds no fake.
"""
