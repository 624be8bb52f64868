"""Parsers for configuration values: text in, typed value out.

Each raises ``ValueError("what is expected")`` for bad text; ``config.parse_keys``
turns that into a ``Problem`` naming the key. Go syntax where operators know it
(durations, booleans).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Callable

from cloudadaptor import wire

# StartVM is given max(10 s, remote_hypervisor_timeout) = 600 s by default.
SHIM_STARTVM_DEADLINE = 600.0
TLS_VERSIONS: tuple[str, ...] = tuple(wire.TLS_VERSIONS)


# Nanoseconds per unit: integer arithmetic is exact, as Go's is (and fractions.Fraction would cost
# the daemon half a MiB of imports: idle memory, issue 16).
_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,  # U+00B5 micro sign
    "μs": 10**3,  # U+03BC greek mu
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?(ns|us|µs|μs|ms|s|m|h)")
DURATION_EXPECTED = "expected a duration like 300ms, 90s, 5m or 1h30m (units ns, us, ms, s, m, h)"


def parse_duration(text: str) -> float:
    """Go ``time.ParseDuration`` syntax without a sign, to seconds: "1h30m" -> 5400.0.

    Like Go, a fraction finer than a nanosecond is dropped ("1.5ns" is 1 ns)."""
    text = text.strip()
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(DURATION_EXPECTED)
    total_ns = 0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or not (match.group(1) or match.group(2)):  # "5m" "1.5s" ".5s" "5.s", not ".s"
            raise ValueError(DURATION_EXPECTED)
        whole, fraction, unit = match.group(1), match.group(2) or "", _DURATION_UNITS[match.group(3)]
        total_ns += int(whole or "0") * unit + int(fraction or "0") * unit // 10 ** len(fraction)
        pos = match.end()
    return total_ns / 10**9


def format_duration(seconds: float) -> str:
    """Seconds as a Go-style duration: 300 -> "5m", 5400 -> "1h30m", 0.3 -> "300ms"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if secs:
        parts.append(f"{round(secs, 3):g}s")
    return "".join(parts)


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    """Go ``strconv.ParseBool``: 1 t T TRUE true True / 0 f F FALSE false False."""
    text = text.strip()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false (or 1/0, t/f)")


def one_of(*choices: str, aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    """A parser for one of ``choices`` (case-insensitive; ``aliases`` map other spellings to a choice)."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        value = (aliases or {}).get(value, value)
        if value not in choices:
            raise ValueError("expected one of: " + ", ".join(choices))
        return value

    return parse


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """A parser for a decimal integer within [lo, hi] (either bound may be open)."""
    if lo is not None and hi is not None:
        expected = f"expected an integer from {lo} to {hi}"
    elif lo is not None:
        expected = f"expected an integer of at least {lo}"
    elif hi is not None:
        expected = f"expected an integer of at most {hi}"
    else:
        expected = "expected an integer"

    def parse(text: str) -> int:
        text = text.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(expected)
        value = int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(expected)
        return value

    return parse


_port = int_range(1, 65535)


def parse_port(text: str) -> int:
    """A TCP/UDP port number, 1..65535."""
    try:
        return _port(text)
    except ValueError:
        raise ValueError("expected a port number from 1 to 65535") from None


def parse_ip(text: str) -> str:
    """An IPv4 or IPv6 address, normalized."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError("expected an IP address such as 192.0.2.1") from None


def parse_csv(text: str) -> tuple[str, ...]:
    """"a, b,,c" -> ("a", "b", "c"): items stripped, empty items dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_tags(text: str) -> dict[str, str]:
    """"k=v,k2=v2" -> {"k": "v", "k2": "v2"}; the first bad pair is named."""
    tags: dict[str, str] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value pairs separated by commas; bad pair {pair.strip()!r}")
        if key in tags:
            raise ValueError(f"expected key=value pairs with distinct keys; {key!r} appears twice")
        tags[key] = value.strip()
    return tags


_CLUSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def parse_cluster_id(text: str) -> str:
    """A tag value naming this cluster: letters, digits, ``_.-``, at most 63 (valid as a tag on every cloud)."""
    text = text.strip()
    if not _CLUSTER_ID.fullmatch(text):
        raise ValueError("expected 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return text


def parse_tls_version(text: str) -> str:
    """"1.2" or "1.3" (also "TLS1.2", "TLSv1.3", Go's "VersionTLS12"); 1.0/1.1 are refused."""
    norm = text.strip().lower().replace("versiontls", "").replace("tlsv", "").replace("tls", "")
    norm = {"12": "1.2", "13": "1.3", "10": "1.0", "11": "1.1"}.get(norm, norm)
    if norm in TLS_VERSIONS:
        return norm
    if norm in ("1.0", "1.1"):
        raise ValueError(f"TLS {norm} is not allowed (insecure); expected 1.2 or 1.3")
    raise ValueError("expected 1.2 or 1.3")


def parse_positive_duration(text: str) -> float:
    """A duration above zero, in seconds (lifetimes, waits)."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("expected a duration above zero, like 90s, 10m or 168h")
    return seconds


def parse_proxy_timeout(text: str) -> float:
    seconds = parse_duration(text)
    if not 0 < seconds < SHIM_STARTVM_DEADLINE:
        raise ValueError(
            "expected a duration greater than 0 and below 10m "
            "(the shim's StartVM deadline is 600 s)"
        )
    return seconds


def parse_abs_path(text: str) -> Path:
    if not os.path.isabs(text):
        raise ValueError("expected an absolute path")
    return Path(text)


def parse_readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError("expected a readable file")
    return path


def parse_host_port(text: str) -> tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" (all interfaces) -> (host, port)."""
    expected = 'expected "host:port" (e.g. 127.0.0.1:50051, [::1]:50051 or :50051)'
    match = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:(\d+)|([^:\[\]\s]*):(\d+)", text.strip())
    if match is None:
        raise ValueError(expected)
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(expected + " with a port from 1 to 65535")
    return host, port
