"""cloud-api-adaptor: the peer-pod provisioner for Kata Containers."""

__version__ = "0.1.0"
