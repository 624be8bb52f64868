"""The builder VM's keys, made per build in this process and never written to disk.

- **Host key.** A new VM's host key cannot be known in advance, so the build
  makes one (ECDSA P-256) and hands it to the VM through cloud-init
  (``ssh_keys``, with the image's own keys deleted and none generated);
  ``ssh.wait_for_ssh`` then accepts only that key. The private half is in the
  VM's user data for the VM's few minutes of life; ``seal`` removes the host
  keys from the image, so no pod VM ever shares it.
- **Login key (Azure).** An RSA key pair (Azure accepts RSA admin keys) whose
  public half goes on the builder VM; the private half lives only in this
  process. AWS has EC2 make its key pair (deleted with the build).
"""

from __future__ import annotations

import io

import paramiko
import yaml

LOGIN_KEY_BITS = 3072
LOGIN_KEY_COMMENT = "peerpod-image-builder"


def new_host_key() -> paramiko.PKey:
    """A fresh host key for one builder VM."""
    return paramiko.ECDSAKey.generate(bits=256)


def public_line(key: paramiko.PKey, comment: str = "") -> str:
    """``<type> <base64> [comment]``: an authorized_keys / known_hosts line."""
    return f"{key.get_name()} {key.get_base64()}" + (f" {comment}" if comment else "")


def host_key_cloud_config(key: paramiko.PKey) -> str:
    """``#cloud-config`` installing ``key`` as the VM's only SSH host key."""
    private = io.StringIO()
    key.write_private_key(private)
    document = {
        "ssh_deletekeys": True,  # the base image's keys (if any) go
        "ssh_genkeytypes": [],  # and none is generated: ours is the only one
        "ssh_keys": {"ecdsa_private": private.getvalue(), "ecdsa_public": public_line(key)},
    }
    return "#cloud-config\n" + yaml.safe_dump(document, default_flow_style=False, sort_keys=True)


def new_login_key() -> tuple[str, paramiko.PKey]:
    """(public key line, private key) of a fresh login key pair."""
    key = paramiko.RSAKey.generate(LOGIN_KEY_BITS)
    return public_line(key, LOGIN_KEY_COMMENT), key
