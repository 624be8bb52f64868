"""A pod VM's serial console for people: the last lines, with secrets removed.

Used when StartVM fails because the agent never answered (the log entry and
the ``PodVMFailed`` event carry the tail) and by ``cloud-api-adaptor console``.
A console can echo what the VM was given: its TLS key (in the user data) and
registry credentials (``auth.json``). ``scrub`` removes private-key blocks,
credential-looking JSON fields, and every secret line of the sandbox's own
user data wherever it appears.
"""

from __future__ import annotations

import re

from cloudadaptor.providers import base as providers

TAIL_LINES = 20
MAX_LINE = 300
REDACTED = "<redacted>"

_KEY_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)
_CRED_FIELD = re.compile(r'("(?:auth|password|identitytoken|registrytoken|token|secret)"\s*:\s*")[^"]*(")', re.I)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def secret_lines(user_data: str) -> set[str]:
    """Lines of ``user_data`` that must never be shown: private-key material and credential values."""
    found: set[str] = set()
    for block in _KEY_BLOCK.findall(user_data.replace("\\n", "\n")):
        found.update(line.strip() for line in block.splitlines() if len(line.strip()) >= 16 and "-----" not in line)
    for match in re.finditer(r'"(?:auth|password|identitytoken|registrytoken)"\s*:\s*"([^"]{8,})"', user_data, re.I):
        found.add(match.group(1))
    return found


def scrub(text: str, secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """``text`` without private-key blocks, credential fields, terminal escapes or any of ``secrets``."""
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _KEY_BLOCK.sub(f"-----{REDACTED} PRIVATE KEY-----", text)
    text = _CRED_FIELD.sub(rf"\g<1>{REDACTED}\g<2>", text)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def tail(text: str, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines, each cut to ``MAX_LINE`` characters."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    return [line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..." for line in kept]


async def console_tail(provider: providers.Provider, instance_id: str, user_data: str = "",
                       lines: int = TAIL_LINES) -> str:
    """The VM's last console lines, scrubbed, or one line saying why there are none. Never raises."""
    try:
        text = await provider.console_output(instance_id)
    except providers.ConsoleUnavailable as exc:
        return f"console not available: {exc}"
    except Exception as exc:  # a provider bug must not change StartVM's outcome
        return f"console not available: {type(exc).__name__}: {exc}"
    shown = tail(scrub(text, secret_lines(user_data)), lines)
    if not shown:
        return f"console of VM {instance_id} is empty"
    return f"last {len(shown)} console lines of VM {instance_id}:\n" + "\n".join(shown)
